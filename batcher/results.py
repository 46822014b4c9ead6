"""Result rows from answers and errors: pure functions of what came back, no I/O.

Every engine builds its output rows here, so a row looks the same whichever way it was sent:
an answer's cost is priced (the answered model's price, else the requested one's), a
multi-input answer (embeddings) is split into one row per input, and every text that
repeats what a server said is masked for secrets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from batcher.errors import ProviderError
from batcher.pricing import Price, cost_usd
from batcher.types import Answer, HttpRequest, HttpResponse, RequestRow, ResultRow, Usage

_second: tuple[int, str] = (-1, "")
"""The last whole second :func:`now_iso` formatted, and its text (one tuple: swapped whole,
so threads never see half an update)."""


def now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds and a ``Z``
    (``datetime.now(UTC).isoformat(timespec="milliseconds")``, its date and time formatted
    once a second: every result row is stamped)."""
    micros = round(time.time() * 1_000_000)   # as datetime.now rounds it
    whole, fraction = divmod(micros, 1_000_000)
    global _second
    second, text = _second
    if second != whole:
        text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, text)
    return f"{text}.{fraction // 1000:03d}Z"


def split(total: int | None, parts: int) -> list[int | None]:
    """``total`` shared out as evenly as whole numbers allow (None stays None)."""
    if total is None:
        return [None] * parts
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True, slots=True)
class Sent:
    """An answered request: the response, its parsed answer, every send made for it, the
    answering send's time on the wire (``latency_ms``) and the time before it (``wait_ms``)."""

    response: HttpResponse
    answer: Answer
    attempts: int
    latency_ms: float | None
    wait_ms: float | None


@dataclass(frozen=True, slots=True)
class Failed:
    """A request that ended in a row error (retries exhausted, or not retryable)."""

    error: ProviderError
    attempts: int
    latency_ms: float | None
    wait_ms: float | None
    response: HttpResponse | None


@dataclass(frozen=True, slots=True)
class RowBuilder:
    """Builds output rows. ``price_of(model)`` prices a model (None: unknown); ``redact``
    masks secrets in any text a server sent; ``keep_raw`` keeps the raw body (masked);
    ``default_model`` names the model of an error row whose input row names none."""

    price_of: Callable[[str | None], Price | None]
    redact: Callable[[str], str]
    keep_raw: bool = False
    default_model: str | None = None

    def ok_rows(self, rows: list[RequestRow], request: HttpRequest,
                sent: Sent) -> list[ResultRow]:
        """The rows of one answered request: one row, or one per input of a multi-input
        request (each with an even share of the reported usage)."""
        if len(rows) == 1:
            return [self.ok_row(rows[0], request, sent, sent.answer)]
        vectors = sent.answer.embeddings or []
        if len(vectors) != len(rows):
            message = f"the server returned {len(vectors)} embeddings for {len(rows)} inputs"
            return [self.error_row(r, message, "invalid_response", attempts=sent.attempts,
                                   status=sent.response.status, latency_ms=sent.latency_ms,
                                   wait_ms=sent.wait_ms, response=sent.response) for r in rows]
        # One request's usage is shared out evenly: the server reports it only in total.
        shares = split(sent.answer.usage.prompt_tokens, len(rows))
        return [
            self.ok_row(r, request, sent,
                        replace(sent.answer, embedding=vector, embeddings=None,
                                usage=Usage(prompt_tokens=share, total_tokens=share)))
            for r, vector, share in zip(rows, vectors, shares, strict=True)
        ]

    def ok_row(self, row: RequestRow, request: HttpRequest, sent: Sent,
               answer: Answer) -> ResultRow:
        """The output row of ``answer`` (the whole answer, or one input's share of it)."""
        response, usage = sent.response, answer.usage
        # The answered model's price, else the requested one's (gateways rename models).
        cost = cost_usd(self.price_of(answer.model), usage) if answer.model else None
        if cost is None:
            cost = cost_usd(self.price_of(request.model), usage)
        return ResultRow(
            id=row.id, status="ok", output=answer.output, parsed=answer.parsed,
            finish_reason=answer.finish_reason,
            finish_reason_raw=answer.finish_reason_raw, model=answer.model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens, cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens, cost_usd=cost, latency_ms=sent.latency_ms,
            wait_ms=sent.wait_ms, ttft_ms=response.ttft_ms, attempts=sent.attempts,
            http_status=response.status,
            response_id=answer.response_id, tool_calls=answer.tool_calls,
            embedding=answer.embedding,
            raw=self.redact(response.body.decode("utf-8", "replace")) if self.keep_raw else None,
            completed_at=now_iso(), columns=row.columns, ordinal=row.ordinal,
        )

    def error_row(self, row: RequestRow, message: str, kind: str, *, attempts: int,
                  status: int | None, latency_ms: float | None, wait_ms: float | None = None,
                  response: HttpResponse | None = None) -> ResultRow:
        """An error row: the (masked) message, its kind, and what is known of the sends."""
        raw = None
        if self.keep_raw and response is not None:
            raw = self.redact(response.body.decode("utf-8", "replace"))
        return ResultRow(
            id=row.id, status="error", error=self.redact(message), error_type=kind,
            attempts=attempts, http_status=status, latency_ms=latency_ms, wait_ms=wait_ms,
            raw=raw, completed_at=now_iso(), columns=row.columns,
            model=row.model or self.default_model, ordinal=row.ordinal,
        )
