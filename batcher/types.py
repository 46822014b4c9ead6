"""Value types that flow through batcher: request rows, HTTP requests, parsed answers, result rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # schema.py imports these types; the annotation needs only the name
    from batcher.schema import ResponseSchema

JSON = Mapping[str, "JSON"] | Sequence["JSON"] | str | int | float | bool | None
"""A decoded JSON value, checked: reading a field gives another JSON value, which the code
must narrow (``isinstance``) before using it as a dict, list, str or number. Servers' answers
are untrusted, so the adapters read them this way, field by field, rather than through
TypedDicts that would promise a shape no one checked. Mapping and Sequence (read-only) let a
``dict[str, JSON]`` or ``list[dict[str, JSON]]`` built in code pass as JSON."""

RowShape = Literal["prompt", "messages", "batch", "template"]

FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "error")
"""The normalised values of ``finish_reason``; the vendor's own value goes to ``finish_reason_raw``."""


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One input row = one request.

    Exactly one of ``prompt``, ``messages`` or ``body`` is set:
    - ``prompt``: a single user turn (shapes ``prompt`` and ``template``);
    - ``messages``: chat messages as given (shape ``messages``);
    - ``body``: an OpenAI Batch API line's body, sent as is to ``url`` (shape ``batch``).

    ``model`` and ``params`` are the row's own overrides of the job's (may be empty).
    ``columns`` are the input's own columns carried through to the output, already made
    Parquet-friendly (scalars as they are; lists/dicts as JSON text).
    ``source`` and ``line`` say where the row came from (1-based line for JSONL, 1-based
    row for Parquet), for error messages. ``ordinal`` is its 1-based data-row number in the
    whole input (0: not known); its result carries it, so that a resume can tell the rows
    already done by number (:func:`batcher.io.idindex.plan_from_ordinals`).
    """

    id: str
    shape: RowShape
    source: str
    line: int
    prompt: str | None = None
    messages: list[dict[str, JSON]] | None = None
    body: dict[str, JSON] | None = None
    url: str | None = None
    model: str | None = None
    params: Mapping[str, JSON] = field(default_factory=dict)
    columns: Mapping[str, JSON] = field(default_factory=dict)
    ordinal: int = 0


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the job says about every request; a provider combines it with a row.

    ``base_url`` includes the version path (``https://api.openai.com/v1``).
    ``api_key`` may be empty (local servers). ``params`` are the job's request parameters;
    a row's own ``params`` override them key by key. ``headers`` are extra headers given
    by the user (``--header``). ``response_schema`` is ``--response-format``'s schema: each
    provider sends it in its vendor's form and checks every answer against it.
    """

    base_url: str
    model: str | None
    api_key: str = field(default="", repr=False)
    system: str | None = None
    params: Mapping[str, JSON] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    response_schema: ResponseSchema | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A provider-built HTTP request. ``body`` is already encoded JSON bytes.

    ``stream`` tells the transport the answer is a server-sent event stream
    (the transport then measures time to first byte). ``model`` is the model asked for,
    used for pricing and token accounting. ``response_schema``: the answer must fit it (the
    provider's parse step checks it; the schema itself is already in ``body``).
    """

    method: str
    url: str
    headers: Mapping[str, str] = field(repr=False)
    body: bytes
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    response_schema: ResponseSchema | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What the transport got back: status, headers (lower-cased names), the whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    ttft_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage, normalised across vendors. ``None`` means the server did not say."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful answer, parsed by a provider from a 2xx response.

    ``output`` is the text (None for embeddings); ``embedding`` the vector for embeddings;
    ``tool_calls`` the tool calls as JSON text when the model made any; ``parsed`` the answer
    checked against ``--response-format``'s schema, as compact JSON text.
    """

    output: str | None
    finish_reason: str | None
    finish_reason_raw: str | None
    model: str | None
    usage: Usage
    response_id: str | None = None
    tool_calls: str | None = None
    embedding: list[float] | None = None
    embeddings: list[list[float]] | None = None
    """Every vector of a multi-input embeddings request, in input order."""
    parsed: str | None = None


Status = Literal["ok", "error"]


@dataclass(slots=True)
class ResultRow:
    """One output row: the answer (or the final error) for one input id.

    Columns are those PRODUCT.md promises; ``columns`` holds the input's own columns.
    ``completed_at`` is an ISO-8601 UTC timestamp.
    """

    id: str
    status: Status
    output: str | None = None
    parsed: str | None = None
    """``--response-format``: the answer parsed and validated, as JSON text."""
    finish_reason: str | None = None
    finish_reason_raw: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None
    cost_usd_original: float | None = None
    """Served from the response cache: what the answer cost when it was first paid for."""
    cached: bool = False
    latency_ms: float | None = None
    """The answering attempt's time on the wire (not the wait before it)."""
    wait_ms: float | None = None
    """Time the row waited before that attempt: pacing, cooldowns, earlier attempts, backoff."""
    ttft_ms: float | None = None
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None
    error_type: str | None = None
    response_id: str | None = None
    tool_calls: str | None = None
    embedding: list[float] | None = None
    raw: str | None = None
    completed_at: str = ""
    columns: Mapping[str, JSON] = field(default_factory=dict)
    ordinal: int = 0
    """The input row's ordinal (:attr:`RequestRow.ordinal`): kept in the state, not in the
    output."""
