"""What the simulator saw and answered: live counters, readable from any thread."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from batcher.types import JSON

RETRY_DELAYS_KEPT = 100_000


def _quantiles(values: list[float]) -> dict[str, JSON]:
    """count, p50, p90, p99 (nearest rank) and max of ``values`` (ms, rounded to 0.1);
    None for each when there are none."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {"count": len(ordered),
            **{f"p{q}": round(ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)], 1)
               for q in (50, 90, 99)},
            "max": round(ordered[-1], 1)}


@dataclass(slots=True)
class BatchCounters:
    """The Batch API routes' counters: files uploaded, batches created (``creates_by_part``
    keyed ``JOB:PART`` from the create's ``batcher_job``/``batcher_part`` metadata), lines
    received, cancels, polls (``GET`` of one batch) and the largest input in bytes."""

    files: int = 0
    creates: int = 0
    creates_by_part: dict[str, int] = field(default_factory=dict)
    lines: int = 0
    cancels: int = 0
    polls: int = 0
    largest_input: int = 0
    """Bytes of the largest batch input received (an uploaded file, an Anthropic create)."""

    def as_dict(self) -> dict[str, JSON]:
        return {"files": self.files, "creates": self.creates,
                "creates_by_part": dict(self.creates_by_part), "lines": self.lines,
                "cancels": self.cancels, "polls": self.polls,
                "largest_input": self.largest_input}


@dataclass(slots=True)
class Stats:
    """Counters of one simulator app, mutated only by its event loop.

    - ``requests``: API requests received (``/_stats`` and ``/v1/models`` not counted);
      ``by_path`` the same split by URL path (never the query string).
    - ``by_status``: answers sent, by HTTP status (a cut stream counts under its 200);
      dropped and hung requests are not answers: they count in ``faults`` only.
    - ``ok``: successful answers fully sent (2xx with a valid body; a 200 with an invalid
      body or a cut stream is not ok). ``prompt_tokens``/``completion_tokens`` sum the usage
      those answers reported; ``usage_by_model`` splits it by the model answered, with
      ``requests`` counting ok answers.
    - ``faults``: injected faults by kind (``500``, ``429``, ``drop``, ``hang``, …), random
      or scripted; ``rate_limited`` the 429s from rpm/tpm enforcement.
    - ``strict_admitted`` / ``strict_refused``: requests the ``strict_rpm`` interval limiter
      let through / answered 429 (those 429s are not in ``rate_limited``).
    - ``resent_after_ok``: requests whose raw body (sha1) had already got an ok answer —
      i.e. work the client paid for twice.
    - ``retry_delays_ms``: for each request whose raw body was last answered with a 5xx,
      the milliseconds from that answer to this arrival: how soon the client retried (the
      first :data:`RETRY_DELAYS_KEPT`; :meth:`as_dict` gives their count and quantiles).
    - ``in_flight`` / ``max_in_flight``: requests being handled now / at most at once.

    Another thread may read the fields or call :meth:`as_dict` at any time (a consistent
    enough snapshot: each container is copied atomically under the GIL).
    """

    requests: int = 0
    ok: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_path: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    strict_admitted: int = 0
    strict_refused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    resent_after_ok: int = 0
    retry_delays_ms: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    batches: BatchCounters = field(default_factory=BatchCounters)

    def record_ok(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.ok += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        per = self.usage_by_model.get(model)
        if per is None:
            per = self.usage_by_model[model] = {
                "prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        per["prompt_tokens"] += prompt_tokens
        per["completion_tokens"] += completion_tokens
        per["requests"] += 1

    def count_fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def record_retry(self, delay_ms: float) -> None:
        if len(self.retry_delays_ms) < RETRY_DELAYS_KEPT:
            self.retry_delays_ms.append(delay_ms)

    def as_dict(self) -> dict[str, JSON]:
        """A JSON-ready snapshot (``by_status`` keys become strings, as JSON requires)."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "by_status": {str(k): v for k, v in sorted(dict(self.by_status).items())},
            "by_path": dict(self.by_path),
            "faults": dict(self.faults),
            "rate_limited": self.rate_limited,
            "strict_admitted": self.strict_admitted,
            "strict_refused": self.strict_refused,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usage_by_model": {m: dict(u) for m, u in list(self.usage_by_model.items())},
            "resent_after_ok": self.resent_after_ok,
            "retry_delay_ms": _quantiles(self.retry_delays_ms),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "batches": self.batches.as_dict(),
        }
