"""``batcher status``: what a state folder says, read without taking its lock or changing
anything. See :mod:`batcher.checkpoint`."""

from __future__ import annotations

import contextlib
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from batcher.state.lock import _probe_lock
from batcher.state.record import _list_state, _read_spend, _Record, _scan, read_meta, state_dir_for
from batcher.types import JSON

# --- status -------------------------------------------------------------------------------


def _last_update(state: Path) -> str | None:
    latest = 0.0
    with contextlib.suppress(OSError):
        for entry in os.scandir(state):
            if entry.name == "lock":
                continue
            with contextlib.suppress(OSError):
                latest = max(latest, entry.stat().st_mtime)
    if not latest:
        return None
    return (datetime.fromtimestamp(latest, UTC).isoformat(timespec="seconds")
            .replace("+00:00", "Z"))


def _retrying_scan(state: Path, output: Path) -> tuple[dict[str, JSON], _Record]:
    # A live run renames and deletes files under us (compaction, finalize); rescan on a miss.
    for attempt in range(5):
        try:
            meta = read_meta(state) or {}
            return meta, _scan(state, output, meta, repair=False)
        except (FileNotFoundError, ValueError):
            if attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _output_only(output: Path) -> _Record:
    rec = _Record()
    try:
        spent, rows = _read_spend(output)
        rec.counters.add(spent)
        rec.add_source(output, rows)
        rec.resolve()
    except (OSError, ValueError, pa.ArrowException) as exc:
        rec.warnings.append(f"{output} could not be read: {exc}")
    return rec


def status(output: Path) -> dict[str, JSON]:
    """What a job did and has left; safe while a job runs (takes no lock, changes nothing).

    Keys: ``output``, ``state_dir``, ``state_exists``, ``output_exists``, ``running`` (a live
    process holds the lock), ``holder`` (its ``{pid, host, started_at, run_id}`` or None),
    ``state`` (the job status from meta: running/finished/interrupted/aborted or None),
    ``run_id``, ``total_rows`` (None until the runner records it), ``bad_rows``, ``done``
    (ids with a result), ``ok``, ``error``, ``pending`` (``total_rows - done``, None when the
    total is unknown), ``prompt_tokens``, ``completion_tokens``, ``cost_usd`` (None while some
    answered row's usage or cost is unknown) and the partial sums and row counts beside them
    (see :meth:`batcher.spend.Spend.totals`),
    ``last_update`` (ISO-8601 UTC of the latest state write), ``finalized_rows``,
    ``corrupt_parts``, ``warnings``. With no state dir but an output, counts come from the
    output file itself.
    """
    output = Path(output)
    state = state_dir_for(output)
    state_exists = state.is_dir()
    running, holder = _probe_lock(state) if state_exists else (False, None)
    meta: dict[str, JSON] = {}
    if state_exists:
        meta, rec = _retrying_scan(state, output)
    elif output.is_file():
        rec = _output_only(output)
    else:
        rec = _Record()
    total = meta.get("total_rows")
    done = rec.done
    pending = max(0, total - done) if isinstance(total, int) else None
    counters = rec.counters.as_dict()
    return {
        "output": str(output),
        "state_dir": str(state),
        "state_exists": state_exists,
        "output_exists": output.is_file(),
        "running": running,
        "holder": holder,
        "state": meta.get("status"),
        "run_id": meta.get("run_id"),
        "total_rows": total,
        "bad_rows": meta.get("bad_rows"),
        "done": done,
        **counters,
        "pending": pending,
        "last_update": _last_update(state) if state_exists else None,
        "finalized_rows": meta.get("finalized_rows"),
        "corrupt_parts": len(rec.corrupt) + len(_list_state(state).corrupt if state_exists
                                                 else {}),
        "warnings": rec.warnings,
    }
