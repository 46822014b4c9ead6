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
from functools import lru_cache
from typing import Protocol, runtime_checkable

import orjson

from batcher.errors import (
    AuthError,
    BadRequest,
    InputError,
    InvalidResponse,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    Retryable,
    ServerError,
)
from batcher.types import JSON, Answer, HttpRequest, HttpResponse, RequestContext, RequestRow

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})

QUOTA_MARKERS = ("insufficient_quota", "billing", "quota_exceeded", "credit")
"""Error *codes/types* (not free text) that mean the account has no credit left."""
QUOTA_CODES = frozenset({
    "insufficient_quota",
    "insufficient_user_quota",  # one-api/new-api gateways
    "billing_hard_limit_reached",
    "billing_not_active",
    "billing_error",  # Anthropic 402
    "quota_exceeded",
})
"""Error codes/types meaning the account has no credit; such an error aborts the job."""


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


@lru_cache(maxsize=64)
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
        data: JSON = orjson.loads(response.body)
        return data
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
    """A rate limit's wait in seconds: the :func:`advised_wait`, else the larger of
    ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens``. None when none is given.
    Header names must be lower-case."""
    advised = advised_wait(headers, now)
    if advised is not None:
        return advised
    resets = [
        d for d in (parse_duration(headers.get("x-ratelimit-reset-requests", "")),
                    parse_duration(headers.get("x-ratelimit-reset-tokens", "")))
        if d is not None
    ]
    return max(resets) if resets else None


def advised_wait(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait the server advises in so many words, in seconds: ``retry-after-ms``, else
    ``retry-after`` (seconds or an HTTP date). None when neither is given.

    A LiteLLM proxy's ``llm_provider-retry-after-ms`` / ``llm_provider-retry-after`` (the
    upstream provider's advice) count as well: when both the proxy and the upstream advise a
    wait, the longer one wins, since retrying earlier than either said gets another refusal.
    Header names must be lower-case."""
    advised = [wait for wait in (_retry_after(headers, "", now),
                                 _retry_after(headers, LITELLM_PREFIX, now))
               if wait is not None]
    return max(advised) if advised else None


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
        # Only a stated Retry-After: gateways that send x-ratelimit-reset-* send them on
        # every answer, and they say when a rate window refills, not when a 5xx is over.
        # Taken as advice, they held every retry of a 5xx until the window's end: the next
        # second-slice on the simulator, hours behind a requests-per-day limit.
        return ServerError(text, status=status, retry_after=advised_wait(response.headers))
    return BadRequest(text, status=status)


# --- finish reasons --------------------------------------------------------------------

FINISH_REASONS_OPENAI: Mapping[str, str] = {
    # the model ended on its own
    "stop": "stop",
    "eos": "stop",
    "eos_token": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    # a token limit cut the answer
    "length": "length",
    "max_tokens": "length",
    "model_length": "length",
    # the model asked for a tool
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "tool_use": "tool_calls",
    # a filter blocked or cut the answer
    "content_filter": "content_filter",
    "safety": "content_filter",
    "refusal": "content_filter",
    # the server gave up mid-answer (vLLM, some gateways)
    "error": "error",
    "abort": "error",
}
"""OpenAI-style ``finish_reason`` → normalised value. Any other value becomes ``"stop"``
(the answer did end, and the raw value stays in ``finish_reason_raw``)."""


def normalise_finish_reason(raw: JSON, table: Mapping[str, str] = FINISH_REASONS_OPENAI,
                            default: str = "stop") -> tuple[str | None, str | None]:
    """(normalised, raw) for a vendor's finish reason; (None, None) when the server gave none."""
    if raw is None or raw == "":
        return None, None
    text = str(raw)
    return table.get(text.lower(), default), text


# --- small shared helpers --------------------------------------------------------------


def as_int(value: JSON) -> int | None:
    """An integer token count, or None for anything that is not one (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def json_text(value: JSON) -> str:
    """Compact JSON text (UTF-8, not ASCII-escaped) of a decoded value."""
    return orjson.dumps(value).decode("utf-8")


def merge_headers(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ``extra`` laid over it; names compare case-insensitively, so a user's
    ``authorization`` replaces ours rather than being sent twice."""
    merged = dict(base)
    for name, value in extra.items():
        for existing in [k for k in merged if k.lower() == name.lower()]:
            del merged[existing]
        merged[name] = value
    return merged


def has_header(headers: Mapping[str, str], name: str) -> bool:
    return any(k.lower() == name.lower() for k in headers)


def param_max_tokens(params: Mapping[str, JSON]) -> int | None:
    """The answer-length cap the user asked for, whatever the vendor calls it."""
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "maxOutputTokens"):
        value = as_int(params.get(key))
        if value is not None:
            return value
    return None


def require_model(row: RequestRow, ctx: RequestContext, given: JSON = None) -> str:
    """The model for a row: ``given`` (e.g. a Batch body's), the row's, then the job's."""
    model = given or row.model or ctx.model
    if not model or not isinstance(model, str):
        raise InputError(row.source, "no model: give --model or a per-row model", row.line,
                         "model")
    return model


def user_messages(row: RequestRow) -> list[dict[str, JSON]]:
    """The row's chat messages: as given, or its prompt as one user message."""
    if row.messages is not None:
        return [dict(m) for m in row.messages]
    if row.prompt is None:
        raise InputError(row.source, "row has neither prompt nor messages", row.line, "prompt")
    return [{"role": "user", "content": row.prompt}]


# --- errors inside bodies --------------------------------------------------------------


ERROR_CODE_STATUS: Mapping[str, int] = {
    # rate limits
    "rate_limit_exceeded": 429, "rate_limit_error": 429, "rate_limited": 429,
    "too_many_requests": 429, "resource_exhausted": 429,
    # authentication / permission
    "invalid_api_key": 401, "authentication_error": 401, "unauthenticated": 401,
    "invalid_authentication": 401, "unauthorized": 401,
    "permission_error": 403, "permission_denied": 403, "access_denied": 403, "forbidden": 403,
    # the request itself
    "invalid_request_error": 400, "invalid_argument": 400, "bad_request": 400,
    "context_length_exceeded": 400, "invalid_value": 400, "failed_precondition": 400,
    "not_found_error": 404, "not_found": 404, "model_not_found": 404,
    "request_too_large": 413,
    # the server
    "server_error": 500, "api_error": 500, "internal": 500, "internal_error": 500,
    "internal_server_error": 500, "unavailable": 503, "service_unavailable": 503,
    "overloaded_error": 529, "overloaded": 529,
    "timeout": 504, "timeout_error": 504, "deadline_exceeded": 504,
}
"""Machine error codes/types (OpenAI, Anthropic, Gemini and gateways) → the HTTP status they
stand for. Used when an error object arrives with a 2xx status (in a body or a stream)."""

UNKNOWN_ERROR_STATUS = 500
"""An error object whose code we do not know is treated as a server fault (retried, bounded
by --max-attempts) rather than silently failing the row."""


def error_tokens(err: Mapping[str, JSON]) -> list[str]:
    """The machine identifiers of an error object (code, type, status), lower-cased."""
    return [str(err[k]).strip().lower() for k in ("code", "type", "status")
            if isinstance(err.get(k), str | int) and not isinstance(err.get(k), bool)]


def is_quota_error(tokens: list[str]) -> bool:
    return any(t in QUOTA_CODES or any(m in t for m in QUOTA_MARKERS) for t in tokens)


def status_for_error(err: Mapping[str, JSON]) -> int:
    """The HTTP status an error object stands for: a numeric code or status (400–599) first,
    then the known codes of :data:`ERROR_CODE_STATUS`, else :data:`UNKNOWN_ERROR_STATUS`."""
    for key in ("code", "status"):
        value = err.get(key)
        number = int(value) if isinstance(value, str) and value.isdigit() else as_int(value)
        if number is not None and 400 <= number <= 599:
            return number
    for token in error_tokens(err):
        if token in ERROR_CODE_STATUS:
            return ERROR_CODE_STATUS[token]
    return UNKNOWN_ERROR_STATUS


def retag(error: ProviderError, message: str, status: int | None) -> ProviderError:
    """The same error class with another message and HTTP status (retry advice kept)."""
    if isinstance(error, Retryable):
        return type(error)(message, status=status, retry_after=error.retry_after)
    return type(error)(message, status=status)


def error_message(err: Mapping[str, JSON], fallback: bytes = b"") -> str:
    message = err.get("message")
    if isinstance(message, str) and message:
        return " ".join(message.split())[:300]
    return snippet(fallback or orjson.dumps(err))


def error_from_object(err: JSON, response: HttpResponse,
                      where: str = "error object") -> ProviderError:
    """The typed error for an ``{"error": …}`` object found in a 2xx body or a stream.

    The class is decided by the object's machine code (never by its message): quota codes
    → QuotaExhausted; otherwise the status from :func:`status_for_error`, classed as
    :func:`batcher.providers.base.error_for_status` would class that status.
    ``status`` on the error stays the real HTTP status of the response.
    """
    if not isinstance(err, Mapping):
        text = str(err) if err is not None else "unknown error"
        err = {"message": text}
    tokens = error_tokens(err)
    message = f"HTTP {response.status} {where}: {error_message(err)}"
    if is_quota_error(tokens):
        return QuotaExhausted(message, status=response.status)
    synthetic = HttpResponse(status_for_error(err), response.headers,
                             orjson.dumps({"error": err}))
    return retag(error_for_status(synthetic), message, response.status)


def body_error_tokens(body: bytes) -> list[str]:
    """Error codes of a non-2xx body (empty when it is not a JSON error object)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    err = data.get("error") if isinstance(data, dict) else None
    return error_tokens(err) if isinstance(err, dict) else []


def openai_error(response: HttpResponse) -> ProviderError:
    """The typed error for a non-2xx OpenAI-style answer: :func:`error_for_status`, except
    that a quota/billing error code aborts as QuotaExhausted whatever the status (gateways
    send ``insufficient_user_quota`` with 403 or 400)."""
    error = error_for_status(response)
    if not isinstance(error, QuotaExhausted) and is_quota_error(body_error_tokens(response.body)):
        return QuotaExhausted(error.message, status=response.status)
    return error


def raise_body_error(data: JSON, response: HttpResponse) -> None:
    """Raise the typed error when a 2xx JSON body is an error object (gateways do this)."""
    if isinstance(data, dict) and data.get("error") not in (None, "", {}):
        raise error_from_object(data["error"], response)


def looks_like_json(response: HttpResponse) -> bool:
    """A body that is a JSON object rather than an event stream (a server may ignore
    ``stream: true``, or answer an error as plain JSON)."""
    return response.body.lstrip()[:1] == b"{"


def schema_conflict(row: RequestRow, given: Mapping[str, JSON], *names: str) -> None:
    """InputError when a row's (or the job's) params set what --response-format sets."""
    for name in names:
        if name in given:
            raise InputError(row.source, f"{name!r} is given as a parameter and "
                             "--response-format sets it too; give one of them", row.line, name)
