"""Benchmark: `batcher report` on a generated N-row output; prints wall time and peak RSS.

Run: .venv/bin/python tests/perf/bench_report.py [N] [--keep DIR]   (default N = 1,000,000)
Target (issue 15): a 10M-row output's report in < 30 s and < 300 MB.

The output is written with the writer's own schema, 64k rows per row group as a long run
would leave it, with text answers, an ``expected`` column (so accuracy is computed), two
models, streamed TTFTs, 1.6 % errors (HTTP 503), 12.5 % of rows retried and a 12-hour span of
``completed_at``. The report runs in a child process so its peak RSS is its own
(getrusage of the children); the generator's memory does not count.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.io.writer import RESULT_SCHEMA

CHUNK = 65_536
TARGET_ROWS, TARGET_S, TARGET_MB = 10_000_000, 30.0, 300.0


def _chunk(start: int, n: int) -> pa.Table:
    i = pa.array(range(start, start + n), pa.int64())
    error = pc.equal(pc.bit_wise_and(i, pa.scalar(63, pa.int64())), pa.scalar(0, pa.int64()))

    def mod(k: int) -> pa.Array:
        """A scrambled i mod k (k a power of two), as float64: varied but reproducible."""
        scrambled = pc.multiply(i, pa.scalar(2654435761, pa.int64()))
        return pc.cast(pc.bit_wise_and(scrambled, pa.scalar(k - 1, pa.int64())), pa.float64())

    def ok_or_null(arr: pa.Array) -> pa.Array:
        return pc.if_else(error, pa.scalar(None, arr.type), arr)
    status = pc.if_else(error, pa.scalar("error"), pa.scalar("ok"))
    answer = pc.cast(pc.bit_wise_and(i, pa.scalar(3, pa.int64())), pa.string())
    columns = {
        "id": pc.cast(i, pa.string()),
        "status": status,
        "output": ok_or_null(answer),
        "finish_reason": ok_or_null(pc.if_else(pc.equal(mod(16), pa.scalar(0.0)),
                                               pa.scalar("length"), pa.scalar("stop"))),
        "model": pc.if_else(pc.equal(pc.bit_wise_and(i, pa.scalar(1, pa.int64())),
                                     pa.scalar(0, pa.int64())),
                            pa.scalar("gpt-4o-mini"), pa.scalar("gpt-4.1-nano")),
        "prompt_tokens": ok_or_null(pc.add(pc.cast(mod(64), pa.int64()), pa.scalar(20, pa.int64()))),
        "completion_tokens": ok_or_null(pc.add(pc.cast(mod(8), pa.int64()), pa.scalar(1, pa.int64()))),
        "cost_usd": ok_or_null(pc.multiply(mod(64), pa.scalar(1e-6))),
        "latency_ms": pc.add(pc.multiply(mod(1024), pa.scalar(1.5)), pa.scalar(80.0)),
        "ttft_ms": pc.add(mod(256), pa.scalar(30.0)),
        "attempts": pc.cast(pc.add(pc.cast(pc.equal(mod(8), pa.scalar(0.0)), pa.int64()),
                                   pa.scalar(1, pa.int64())), pa.int32()),
        "http_status": pc.cast(pc.if_else(error, pa.scalar(503), pa.scalar(200)), pa.int32()),
        "error": pc.if_else(error, pa.scalar("HTTP 503: upstream unavailable"),
                            pa.scalar(None, pa.string())),
        "error_type": pc.if_else(error, pa.scalar("server_error"), pa.scalar(None, pa.string())),
        "completed_at": pc.cast(pc.add(pc.divide(pc.multiply(i, pa.scalar(4320, pa.int64())),
                                                 pa.scalar(1000, pa.int64())),
                                       pa.scalar(1_767_225_600_000, pa.int64())),
                                pa.timestamp("ms", tz="UTC")),
    }
    schema = pa.schema([f for f in RESULT_SCHEMA if f.name != "embedding"]
                       + [pa.field("expected", pa.string())])
    columns["expected"] = answer
    arrays = [columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def generate(path: Path, rows: int) -> None:
    schema = _chunk(0, 1).schema
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, CHUNK):
            writer.write_table(_chunk(start, min(CHUNK, rows - start)), row_group_size=CHUNK)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = int(args[0]) if args else 1_000_000
    keep = sys.argv[sys.argv.index("--keep") + 1] if "--keep" in sys.argv else None
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        bench(Path(keep), rows)
        return
    with tempfile.TemporaryDirectory(prefix="bench_report_") as folder:
        bench(Path(folder), rows)


def bench(folder: Path, rows: int) -> None:
    out = folder / "big.parquet"
    started = time.perf_counter()
    generate(out, rows)
    print(f"generated {rows:,} rows in {time.perf_counter() - started:.1f} s "
          f"({out.stat().st_size / 1e6:,.0f} MB on disk)")
    command = [sys.executable, "-m", "batcher", "report", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if done.returncode != 0:
        sys.exit(f"batcher report failed ({done.returncode}): {done.stderr[-2000:]}")
    page = Path(done.stdout.strip())
    print(f"batcher report: {rows:,} rows in {elapsed:.1f} s ({rows / elapsed:,.0f} rows/s), "
          f"peak RSS {peak_mb:,.0f} MB, page {page.stat().st_size / 1e3:,.0f} kB")
    verdict = ("met" if elapsed < TARGET_S and peak_mb < TARGET_MB else "MISSED") \
        if rows >= TARGET_ROWS else f"not measured: run with N = {TARGET_ROWS:,}"
    print(f"target: {TARGET_ROWS:,} rows < {TARGET_S:.0f} s and < {TARGET_MB:.0f} MB: {verdict} "
          "(about 2 s and 230 MB are fixed: interpreter, Arrow, Altair, vl-convert's V8)")


if __name__ == "__main__":
    main()
