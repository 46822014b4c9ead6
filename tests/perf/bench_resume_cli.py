"""Benchmark: `batcher run` resuming a 1,000,000-row job with 999,000 rows done — seconds from
the command's start to its first request, and to the end (plain script, prints figures).

    python tests/perf/bench_resume_cli.py [ROWS] [DONE]

The state is built directly (tests/perf/bench_resume.py's builder) with the fingerprint the
runner computes for this exact command, so the CLI resumes it as its own.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from batcher.config import make_config
from batcher.runner import Runner
from batcher.simulate import SimConfig, SimulatorThread
from tests.perf.bench_resume import build


def time_first_request(cmd: list[str], sim: SimulatorThread) -> tuple[int, str, float | None,
                                                                      float]:
    """Run ``cmd`` to its end, watching ``sim``: (exit code, stderr, seconds to the first
    request the simulator saw or None, seconds in all)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and sim.stats.requests > 0:
            first = time.perf_counter() - t0
        time.sleep(0.01)
    total = time.perf_counter() - t0
    stderr = proc.stderr.read() if proc.stderr else ""
    return proc.returncode, stderr, first, total


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    done = int(sys.argv[2]) if len(sys.argv) > 2 else 999_000
    with tempfile.TemporaryDirectory() as tmp, SimulatorThread(SimConfig()) as sim:
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "results.parquet"
        with src.open("wb") as f:
            for i in range(rows):
                f.write(orjson.dumps({"id": f"row-{i:08d}", "prompt": f"Item {i}: fruit?"}))
                f.write(b"\n")
        config = make_config({"input": src, "output": out, "model": "gpt-4o-mini",
                              "base_url": sim.base_url})
        import tests.perf.bench_resume as builder
        builder.FINGERPRINT = Runner(config)._fingerprint()
        build(out, done, rows)
        cmd = [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out), "--base-url",
               sim.base_url, "--model", "gpt-4o-mini", "--no-progress", "--log-format", "json"]
        code, stderr, first, total = time_first_request(cmd, sim)
        if code not in (0, 1):  # 1: the built state holds 1% error rows
            raise SystemExit(stderr[-2000:] or "failed")
        first_s = f"{first:.2f} s" if first is not None else "n/a"
        print(f"resume: {rows:,} rows, {done:,} done: first request after {first_s}, "
              f"{sim.stats.requests:,} sent, whole run incl. finalize {total:.2f} s")


if __name__ == "__main__":
    main()
