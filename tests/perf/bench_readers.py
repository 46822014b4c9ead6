"""Benchmark the input readers: rows/s and peak RSS on 1M generated rows (a plain script).

Run from the repository root: /work/venv/bin/python tests/perf/bench_readers.py [ROWS]
"""

from __future__ import annotations

import gzip
import resource
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, uninstalled
from batcher.io.readers import ReaderOptions, count_rows, iter_batches


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _write_jsonl(path: Path, rows: int) -> None:
    with path.open("wb") as out:
        buffer = []
        for n in range(rows):
            buffer.append(orjson.dumps({"id": f"row-{n:08d}",
                                        "prompt": f"Classify the sentiment of review {n}."}))
            if len(buffer) == 10_000:
                out.write(b"\n".join(buffer) + b"\n")
                buffer = []
        if buffer:
            out.write(b"\n".join(buffer) + b"\n")


def _time_read(path: Path, label: str) -> None:
    start, cpu_start = time.perf_counter(), time.process_time()
    total = 0
    for batch in iter_batches(path, ReaderOptions()):
        total += len(batch.rows)
        assert not batch.problems
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"{label:<14} {total:>9,} rows in {seconds:6.2f} s = {total / seconds:>10,.0f} rows/s"
          f" (CPU {cpu:.2f} s = {total / cpu:,.0f} rows/s)"
          f"   peak RSS so far {_peak_rss_mib():,.0f} MiB")
    start = time.perf_counter()
    counted = count_rows(path)
    seconds = time.perf_counter() - start
    print(f"{'count_rows':<14} {counted:>9,} rows in {seconds:6.3f} s")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    print(f"baseline peak RSS {_peak_rss_mib():,.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "in.jsonl"
        _write_jsonl(jsonl, rows)
        print(f"baseline peak RSS after writing {_peak_rss_mib():,.0f} MiB")
        _time_read(jsonl, "jsonl")
        gz = Path(tmp) / "in.jsonl.gz"
        with jsonl.open("rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        _time_read(gz, "jsonl.gz")
        parquet = Path(tmp) / "in.parquet"
        writer = None
        for start in range(0, rows, 100_000):
            ids = [f"row-{n:08d}" for n in range(start, min(rows, start + 100_000))]
            table = pa.table({"id": ids,
                              "prompt": [f"Classify the sentiment of review {i}." for i in ids]})
            writer = writer or pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
        _time_read(parquet, "parquet")


if __name__ == "__main__":
    main()
