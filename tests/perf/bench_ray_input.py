"""Benchmark ``--engine ray``'s input reading (Ray Data read tasks streaming the content to
the driver) against the local reader: rows/s of the full row pass (ids pre-pass included)
and the driver's peak RSS, for JSONL, gzip JSONL and Parquet, at two sizes. Each case runs
in its own process (peak RSS is per process). A plain script, run by hand:

    python tests/perf/bench_ray_input.py [ROWS]        # default 400000 (and ROWS / 4)

Target (PRODUCT.md, "memory stays flat"): the driver's peak RSS on Ray at ROWS within 15% of
its peak at ROWS / 4.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _write(folder: Path, rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "Classify the sentiment of this review, in one word. " * 6
    lines = [json.dumps({"id": f"row-{n:08d}", "prompt": f"{text}{n}"}) for n in range(rows)]
    data = ("\n".join(lines) + "\n").encode()
    paths = {"jsonl": folder / f"in-{rows}.jsonl", "jsonl.gz": folder / f"in-{rows}.jsonl.gz",
             "parquet": folder / f"in-{rows}.parquet"}
    paths["jsonl"].write_bytes(data)
    with gzip.open(paths["jsonl.gz"], "wb", compresslevel=1) as fh:
        fh.write(data)
    pq.write_table(pa.table({"id": [f"row-{n:08d}" for n in range(rows)],
                             "prompt": [f"{text}{n}" for n in range(rows)]}), paths["parquet"])
    return paths


def _status_mib(field: str) -> float:
    """A figure of /proc/self/status, in MiB: VmHWM is this process's peak RSS (``ru_maxrss``
    would carry the parent's over exec), RssShmem the shared pages in its RSS now (the object
    store's it has mapped), RssAnon its private memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _case(path: str, engine: str) -> None:
    """In a child process: one full row pass (with its ids pre-pass), as the job reads."""
    sys.path.insert(0, str(ROOT))
    from batcher.io.location import InputLocation
    from batcher.io.readers import ReaderOptions, count_rows, iter_batches

    scan = None
    if engine == "ray":
        from batcher.engines.ray.data import RayScan

        scan = RayScan(None)
        scan.connect()
    location = InputLocation(path, scan=scan)
    cpu0, t0 = time.process_time(), time.perf_counter()
    total = count_rows(location)
    rows = sum(len(b.rows) for b in iter_batches(location, ReaderOptions()))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert rows == total, (rows, total)
    print(json.dumps({"rows": rows, "wall": wall, "cpu": cpu, "peak_mib": _status_mib("VmHWM"),
                      "shared_mib": _status_mib("RssShmem"),
                      "private_mib": _status_mib("RssAnon")}))
    if scan is not None:
        scan.close()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        _case(sys.argv[2], sys.argv[3])
        return
    big = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
    print(f"load: {os.getloadavg()}")
    peaks: dict[tuple[str, str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (big // 4, big):
            for kind, path in _write(Path(tmp), rows).items():
                for engine in ("local", "ray"):
                    done = subprocess.run([sys.executable, __file__, "--case", str(path), engine],
                                          capture_output=True, text=True, check=True,
                                          env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"})
                    figures = json.loads(done.stdout.strip().splitlines()[-1])
                    peaks[(kind, engine, rows)] = figures["peak_mib"]
                    print(f"{kind:9} {engine:5} {rows:>9,} rows: "
                          f"{figures['rows'] / figures['wall']:>9,.0f} rows/s, "
                          f"{figures['cpu']:.1f} s CPU (driver), "
                          f"peak RSS {figures['peak_mib']:.0f} MiB (at the end: "
                          f"{figures['shared_mib']:.0f} shared, "
                          f"{figures['private_mib']:.0f} private)")
    for kind in ("jsonl", "jsonl.gz", "parquet"):
        small, large = peaks[(kind, "ray", big // 4)], peaks[(kind, "ray", big)]
        verdict = "met" if large <= small * 1.15 else "NOT met"
        print(f"{kind}: Ray driver peak {small:.0f} -> {large:.0f} MiB "
              f"(x{large / small:.2f}; target <= x1.15: {verdict})")


if __name__ == "__main__":
    main()
