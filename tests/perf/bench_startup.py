"""Start-up time of the CLI (a plain script; prints figures and whether the target is met).

    python tests/perf/bench_startup.py          # `batcher --help` and `batcher run --help`, 15 runs each

Issue 14's target: `batcher --help` in under 0.3 s. The command runs as a new process each
time (the installed console script beside this interpreter), so the figure includes the
interpreter's own start; the median is reported, with the range. Exit status 1 when missed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.3
RUNS = 15


def timed(command: list[str]) -> list[float]:
    took = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        took.append(time.perf_counter() - started)
    return took


def main() -> int:
    script = Path(sys.executable).with_name("batcher")
    missed = False
    for args in (["--help"], ["run", "--help"]):
        took = timed([str(script), *args])
        median = statistics.median(took)
        met = median < TARGET_S
        missed |= not met
        print(f"batcher {' '.join(args):<11} median {median:.3f} s "
              f"(range {min(took):.3f}-{max(took):.3f} s over {RUNS} runs); "
              f"target < {TARGET_S} s: {'met' if met else 'NOT MET'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
