"""The provider interface: build an HTTP request from a row, parse a response; plus shared helpers.

A provider never touches the network and never imports aiohttp: both functions are pure,
so they are tested on golden JSON. Error answers are turned into the typed errors of
:mod:`batcher.errors` here, once; the retry policy looks at nothing but those types.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Protocol, runtime_checkable

import orjson

from batcher.errors import (
    AuthError,
    BadRequest,
    InvalidResponse,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    ServerError,
)
from batcher.types import JSON, Answer, HttpRequest, HttpResponse, RequestContext, RequestRow

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})

QUOTA_MARKERS = ("insufficient_quota", "billing", "quota_exceeded", "credit")
"""Error *codes/types* (not free text) that mean the account has no credit left."""


class Provider(Protocol):
    """One endpoint's wire format. Implementations are stateless and pure."""

    name: str

    def build_request(self, row: RequestRow, ctx: RequestContext) -> HttpRequest:
        """The HTTP request for one row. Raises :class:`batcher.errors.InputError` when the
        row cannot be sent to this endpoint (e.g. messages given to ``embeddings``)."""
        ...

    def parse_response(self, request: HttpRequest, response: HttpResponse) -> Answer:
        """The normalised answer of a 2xx response; raises a typed ProviderError otherwise
        (including for a 2xx whose body is not what the endpoint returns)."""
        ...


@runtime_checkable
class MultiInputProvider(Provider, Protocol):
    """A provider that can send several rows in one request (embeddings)."""

    def build_group_request(self, rows: Sequence[RequestRow], ctx: RequestContext) -> HttpRequest:
        """One request for ``rows``, which share model and params and all have a prompt; the
        answer's ``embeddings`` then hold one vector per row, in order."""
        ...


_REGISTRY: dict[str, Provider] = {}


def register(provider: Provider) -> Provider:
    """Add a provider under its ``name``; the CLI's ``--endpoint`` choices come from here."""
    _REGISTRY[provider.name] = provider
    return provider


def get_provider(name: str) -> Provider:
    """The provider registered as ``name``; KeyError lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown endpoint {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def provider_names() -> list[str]:
    return sorted(_REGISTRY)


# --- helpers shared by providers --------------------------------------------------------


def join_url(base_url: str, path: str) -> str:
    """Join a base URL that includes the version path with an endpoint path.

    ``join_url("https://x/v1", "/chat/completions")`` → ``https://x/v1/chat/completions``;
    a path that repeats the base's version (``/v1/chat/completions``, from Batch API lines)
    is not doubled.
    """
    base = base_url.rstrip("/")
    path = "/" + path.lstrip("/")
    version = base.rsplit("/", 1)[-1]
    if re.fullmatch(r"v\d+(beta\d*|alpha\d*)?", version) and path.startswith(f"/{version}/"):
        path = path[len(version) + 1:]
    return base + path


def merged_params(row: RequestRow, ctx: RequestContext) -> dict[str, JSON]:
    """The job's params with the row's own params laid over them."""
    params = dict(ctx.params)
    params.update(row.params)
    return params


def checked(answer: Answer, request: HttpRequest, status: int,
            text: str | None = None) -> Answer:
    """``answer`` with ``parsed`` set when the request has a response schema: its ``text``
    (default: the answer's output) parsed and validated. Raises SchemaError (retried) or
    SchemaCut (the token limit cut the JSON) as :meth:`ResponseSchema.check` does."""
    schema = request.response_schema
    if schema is None:
        return answer
    text = answer.output if text is None else text
    return replace(answer, output=text, parsed=schema.check(text, answer.finish_reason, status))


def decode_json(response: HttpResponse) -> JSON:
    """The body as JSON; an undecodable 2xx body is retryable (gateways send HTML on hiccups)."""
    try:
        return orjson.loads(response.body)
    except orjson.JSONDecodeError:
        raise InvalidResponse(
            f"HTTP {response.status} body is not valid JSON: {snippet(response.body)}",
            status=response.status,
        ) from None


def snippet(body: bytes, limit: int = 300) -> str:
    """A short, single-line excerpt of a body for error messages."""
    text = body[:limit].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text + ("…" if len(body) > limit else "")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: ``"20ms"``, ``"1s"``, ``"6m0s"``, ``"1.5"``."""
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    total = 0.0
    pos = 0
    for match in _DURATION.finditer(value):
        if match.start() != pos:
            return None
        number, unit = float(match.group(1)), match.group(2)
        total += number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = match.end()
    return total if pos == len(value) and pos > 0 else None


LITELLM_PREFIX = "llm_provider-"
"""LiteLLM's proxy passes the upstream provider's headers on under this prefix, and an upstream
429's ``retry-after`` only so (BerriAI/litellm#21553)."""


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The server's advised wait in seconds, from (in order) ``retry-after-ms``,
    ``retry-after`` (seconds or an HTTP date), then the larger of
    ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens``. None when none is given.

    A LiteLLM proxy's ``llm_provider-retry-after-ms`` / ``llm_provider-retry-after`` (the
    upstream provider's advice) count as well: when both the proxy and the upstream advise a
    wait, the longer one wins, since retrying earlier than either said gets another 429.
    Header names must be lower-case."""
    advised = [wait for wait in (_retry_after(headers, "", now),
                                 _retry_after(headers, LITELLM_PREFIX, now))
               if wait is not None]
    if advised:
        return max(advised)
    resets = [
        d for d in (parse_duration(headers.get("x-ratelimit-reset-requests", "")),
                    parse_duration(headers.get("x-ratelimit-reset-tokens", "")))
        if d is not None
    ]
    return max(resets) if resets else None


def _retry_after(headers: Mapping[str, str], prefix: str, now: float | None) -> float | None:
    """``{prefix}retry-after-ms``, else ``{prefix}retry-after``, in seconds; None if neither
    parses (``nan``/``inf`` do not: a NaN would read as "retry now")."""
    ms = headers.get(prefix + "retry-after-ms")
    if ms:
        try:
            if math.isfinite(wait := float(ms)):
                return max(0.0, wait / 1000.0)
        except ValueError:
            pass
    ra = headers.get(prefix + "retry-after")
    if ra:
        try:
            wait = float(ra)
            return max(0.0, wait) if math.isfinite(wait) else None
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(ra).timestamp()
            except (TypeError, ValueError):
                when = None
            if when is not None:
                return max(0.0, when - (time.time() if now is None else now))
    return None


def _error_fields(body: bytes) -> tuple[str, str]:
    """(machine code/type, message) from an OpenAI/Anthropic/Gemini-style error body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", snippet(body)
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = " ".join(str(err.get(k) or "") for k in ("code", "type", "status")).strip()
        return code.lower(), str(err.get("message") or snippet(body))
    if isinstance(err, str):
        return "", err
    return "", snippet(body)


def error_for_status(response: HttpResponse) -> ProviderError:
    """The typed error for a non-2xx response, decided by status and the body's error *code*.

    Retried: 408, 409, 429, 5xx incl. 520–524 and 529. Job-fatal: 401, 403, and a 429 whose
    error code says the quota or credit is exhausted. Everything else: a row error.
    """
    status = response.status
    code, message = _error_fields(response.body)
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status in (401, 403):
        return AuthError(text, status=status)
    if status == 429 or status == 402:
        if status == 402 or any(marker in code for marker in QUOTA_MARKERS):
            return QuotaExhausted(text, status=status)
        return RateLimited(text, status=status, retry_after=retry_after_seconds(response.headers))
    if status in RETRYABLE_STATUSES or status >= 500:
        return ServerError(text, status=status, retry_after=retry_after_seconds(response.headers))
    return BadRequest(text, status=status)
