"""Benchmark batch mode: N rows (default 1,000,000) through the simulator's OpenAI Batch API.

Two runs of the CLI, each a child process (its peak RSS measured alone):
1. ``--no-wait``: build and upload every part (50,000 requests each) and exit 75: the peak
   RSS while building and uploading, and the time to submit all batches;
2. the same command again: poll, download, map back and write the output: its time and RSS.

Run from the repository root: .venv/bin/python tests/perf/bench_batch.py [ROWS]
(a plain script, not collected by pytest; target: peak RSS < 300 MB).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, uninstalled
from batcher.simulate import SimConfig, SimulatorThread, make_app

_MEASURE = ("import resource, subprocess, sys; "
            "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
"""A wrapper process per run: its RUSAGE_CHILDREN is that one run's peak RSS alone."""


def _run(args: list[str]) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS of the run in MB)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True,
                          text=True, check=False)
    if not done.stdout.strip():
        raise SystemExit(f"the run printed no RSS: {done.stderr[-2000:]}")
    return done.returncode, time.perf_counter() - started, int(done.stdout.strip()) / 1024.0


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    now = [0.0]
    sim = SimulatorThread(SimConfig(batch_seconds=60))
    # The batches end when the script says (after the submit run), on the simulator's clock.
    sim.app = make_app(sim.config, clock=lambda: now[0])
    with tempfile.TemporaryDirectory() as tmp, sim:
        src = Path(tmp) / "in.jsonl"
        with src.open("w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": f"row-{i:08d}",
                                    "prompt": f"Summarise item {i} in one line"}) + "\n")
        out = Path(tmp) / "out.parquet"
        base = [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out),
                "--base-url", sim.base_url, "--model", "gpt-4o-mini", "--mode", "batch",
                "--poll-interval", "0.5", "--no-progress", "--log-format", "json"]
        for label, extra in (("submit (--no-wait)", ["--no-wait"]), ("collect", [])):
            code, seconds, rss = _run([*base, *extra])
            now[0] = 3600.0
            print(f"{label:<20} exit {code:>3}  {seconds:7.1f} s  peak RSS {rss:7.1f} MB")
        counters = sim.stats.batches.as_dict()
        print(f"rows {rows:,}  batches created {counters['creates']}  lines {counters['lines']:,}"
              f"  largest input {counters['largest_input'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
