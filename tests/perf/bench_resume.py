"""Benchmark resuming a big job: open + done_ids on a state with 999,000 of 1,000,000 rows done.

Builds the state fast (parts written directly with pyarrow, 50,000 rows each, plus one live
journal), then times ``StateStore.open`` + ``done_ids`` and a ``finalize`` over it (a plain
script, not collected by pytest).

Run from the repository root: /work/venv/bin/python tests/perf/bench_resume.py [DONE_ROWS]
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, uninstalled
from batcher.checkpoint import StateStore, state_dir_for
from batcher.io.idindex import RowPlan, input_plan_key, save_input_plan
from batcher.io.writer import (
    ORDINAL_COLUMN,
    PART_BATCH_ROWS,
    RESULT_SCHEMA,
    encode_records,
    result_to_record,
)
from batcher.runner import INPUT_PLAN
from batcher.types import ResultRow

PART_ROWS = 50_000
JOURNAL_ROWS = 4_000
FINGERPRINT = {"input": "bench", "model": "bench-model"}


def _part(start: int, count: int) -> pa.Table:
    n = range(start, start + count)
    columns: dict[str, pa.Array] = {}  # type: ignore[type-arg]
    for f in RESULT_SCHEMA:
        if f.name == "id":
            columns["id"] = pa.array([f"row-{i:08d}" for i in n], type=f.type)
        elif f.name == "status":
            columns["status"] = pa.array(["error" if i % 100 == 0 else "ok" for i in n],
                                         type=f.type)
        elif f.name == "output":
            columns["output"] = pa.array([f"The answer to row {i} is positive." for i in n],
                                         type=f.type)
        elif f.name in ("prompt_tokens", "completion_tokens"):
            columns[f.name] = pa.array([20] * count, type=f.type)
        elif f.name == "cost_usd":
            columns[f.name] = pa.array([1e-5] * count, type=f.type)
        else:
            columns[f.name] = pa.nulls(count, f.type)
    columns["expected"] = pa.array([i % 7 for i in n], type=pa.int64())
    columns[ORDINAL_COLUMN] = pa.array([i + 1 for i in n], type=pa.int64())
    return pa.table(columns)


def build(output: Path, done: int, rows: int | None = None) -> None:
    """A state with rows 0 … ``done - 1`` answered (id ``row-%08d``, input ordinal i + 1), as
    a run writes it; with ``rows`` (the input's rows), also what the first run kept of the
    input (no duplicates), so that a resume goes by ordinals."""
    with StateStore.open(output, FINGERPRINT, run_id="bench-build"):
        pass  # creates the state dir and meta.json with the fingerprint
    state = state_dir_for(output)
    in_parts = max(0, done - JOURNAL_ROWS)
    seq = 0
    for start in range(0, in_parts, PART_ROWS):
        seq += 1
        # Row groups as the run's compaction writes them (batcher.io.writer.write_part).
        pq.write_table(_part(start, min(PART_ROWS, in_parts - start)),
                       state / f"part-{seq:06d}.parquet", row_group_size=PART_BATCH_ROWS)
    results = [ResultRow(id=f"row-{i:08d}", status="ok", output="journal answer",
                         prompt_tokens=20, completion_tokens=20, cost_usd=1e-5,
                         columns={"expected": i % 7}, ordinal=i + 1)
               for i in range(in_parts, done)]
    (state / f"journal-{seq + 1:06d}.jsonl").write_bytes(
        encode_records(result_to_record(r) for r in results))
    if rows is not None:
        save_input_plan(state / INPUT_PLAN, input_plan_key(FINGERPRINT), RowPlan(rows))


def main() -> None:
    done = int(sys.argv[1]) if len(sys.argv) > 1 else 999_000
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "results.parquet"
        t0 = time.perf_counter()
        build(output, done)
        print(f"built state with {done:,} done rows in {time.perf_counter() - t0:.2f} s")

        t0 = time.perf_counter()
        store = StateStore.open(output, FINGERPRINT, run_id="bench")
        t_open = time.perf_counter() - t0
        t1 = time.perf_counter()
        ids = store.done_ids(include_errors=False)
        t_ids = time.perf_counter() - t1
        print(f"open: {t_open:.2f} s (incl. compacting a {JOURNAL_ROWS:,}-row journal), "
              f"done_ids: {t_ids:.2f} s, open+done_ids: {t_open + t_ids:.2f} s "
              f"({len(ids):,} ok ids)")
        store.close()

        t0 = time.perf_counter()
        store = StateStore.open(output, FINGERPRINT, run_id="bench-2")
        ids = store.done_ids(include_errors=True)
        print(f"second open+done_ids (parts only): {time.perf_counter() - t0:.2f} s "
              f"({len(ids):,} ids)")

        t0 = time.perf_counter()
        store.finalize()
        store.close()
        rows = pq.read_metadata(output).num_rows
        print(f"finalize: {time.perf_counter() - t0:.2f} s ({rows:,} rows)")

        t0 = time.perf_counter()
        with StateStore.open(output, FINGERPRINT, run_id="bench-3") as store:
            ids = store.done_ids(include_errors=True)
        print(f"open+done_ids after finalize (reads the output): "
              f"{time.perf_counter() - t0:.2f} s ({len(ids):,} ids)")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
