"""What a run reports: its live counters (:class:`Progress`, read by the progress bar) and its
summary (:class:`RunSummary`, written beside the output as ``*.summary.json``)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from batcher.log import get_logger
from batcher.spend import Spend


@dataclass
class Progress:
    """Live counters, updated by the runner, read by whatever renders progress."""

    total: int | None = None
    already_done: int = 0
    ok: int = 0
    error: int = 0
    bad_rows: int = 0
    spend: Spend = field(default_factory=Spend)
    """this run's tokens and cost (partial sums while some row's are unknown)."""
    retries: int = 0
    rate_limited: int = 0
    cache_hits: int = 0
    in_flight: int = 0
    stage: str = ""
    """What the engine is doing, in a few words (batch mode: its batches by state)."""
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.already_done + self.ok + self.error


@dataclass
class RunSummary:
    """What a run did; written beside the output as ``*.summary.json``."""

    run_id: str
    job: str | None
    model: str | None
    input: str
    output: str
    started_at: str
    finished_at: str
    duration_s: float
    outcome: str
    """finished | interrupted | aborted"""
    exit_code: int
    message: str | None
    rows: int
    """ids in the output (ok + error), this run and earlier ones."""
    ok: int
    error: int
    skipped: int
    """bad input rows reported and skipped."""
    resumed: int
    """rows already done when this run started."""
    sent_this_run: int
    """rows this run sent and got an answer or an error for (cache hits are not sent)."""
    prompt_tokens: int | None
    """tokens and cost: the whole output's (every run of it, retried errors included); None
    when some ok row's usage / cost is unknown (never a silent 0: see the ``*_known`` sums
    and the ``rows_*`` counts below)."""
    completion_tokens: int | None
    cost_usd: float | None
    cost_usd_this_run: float | None
    errors_by_type: dict[str, int]
    resume_command: str | None = None
    cache_hits: int = 0
    """rows of this run served from the response cache (not sent, cost 0)."""
    cost_usd_known: float = 0.0
    """the cost of the ``rows_priced`` rows (all of ``cost_usd`` when nothing is unknown)."""
    rows_priced: int = 0
    rows_cost_unknown: int = 0
    """ok rows whose cost is unknown: no price for the model, or no usage reported."""
    prompt_tokens_known: int = 0
    """the tokens of the ``rows_usage_reported`` rows."""
    completion_tokens_known: int = 0
    rows_usage_reported: int = 0
    rows_usage_unknown: int = 0
    """ok rows whose answer carried no usage (e.g. a stream without a usage chunk)."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def usd(amount: float | None) -> float | None:
    """Dollars rounded to 6 decimals for the summary (None stays None)."""
    return round(amount, 6) if amount is not None else None


def write_summary(path: Path, summary: RunSummary) -> None:
    """Atomically write the summary JSON (tmp + rename) so a reader never sees half of it.
    A disk too full for it costs the summary file, not the run: a warning says so."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{socket.gethostname()}.tmp")
    try:
        tmp.write_bytes(orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        get_logger().warning("summary_not_written", path=str(path), reason=str(exc))
