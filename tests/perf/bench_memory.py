"""Memory at scale (issue 13): peak RSS of `batcher run`, `batcher estimate` and a resume, at
100k, 1M and 10M rows, each target printed as met / not met (plain script).

    python tests/perf/bench_memory.py                    # everything (takes long)
    python tests/perf/bench_memory.py run [ROWS ...]     # default 100000 1000000; the 10M
                                                         # figure is fitted from the largest two
    python tests/perf/bench_memory.py estimate [ROWS ...]  # default 100000 1000000 10000000
    python tests/perf/bench_memory.py resume [ROWS]      # default 10000000, all but 1,000 done
    python tests/perf/bench_memory.py dryrun [ROWS]      # wall time, ~800-character prompts
                                                         # (default 1000000; target < 10 s)

BENCH_DATA=FOLDER keeps the generated inputs there between runs; BENCH_BASE=CHECKOUT (dryrun)
runs that checkout's code too, alternating with this one.

Inputs are generated in a temporary folder (JSONL, ~70 bytes a row). `run` goes against the
simulator answering at once (its own process, pinned to CPU 1; the client on CPU 0). A full
10M-row run takes about 45 min on the project's 2-core machine, so `run` measures the sizes
given and fits a line through the largest two to give the 10M figure (said so in the output).
The resume builds the state directly (tests/perf/bench_resume.py's builder) with the
fingerprint the runner computes for the command, and times the first request.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script
from tests.perf.bench_limits import Simulator, pinned
from tests.perf.bench_resume_cli import time_first_request

LIMIT_MB = 300.0
SLOPE = 1.15  # 10M rows within 1.15x of the 1M-row figure
WRAP = ("import resource, sys, runpy; sys.argv = ['batcher'] + sys.argv[1:];"
        "code = 0\n"
        "try:\n runpy.run_module('batcher', run_name='__main__')\n"
        "except SystemExit as e:\n code = e.code or 0\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)")


def make_input(folder: Path, rows: int) -> Path:
    path = folder / f"in-{rows}.jsonl"
    if path.exists():
        return path
    with path.open("wb") as f:
        step = 100_000
        for start in range(0, rows, step):
            f.write(b"".join(
                b'{"id":"row-%08d","prompt":"Classify item %d: fruit or tool?"}\n' % (i, i)
                for i in range(start, min(rows, start + step))))
    return path


CPU_SECONDS: list[float] = []
"""CPU seconds (user + system) of each measured command, in order: on a shared machine these
vary less than wall time."""


def measured(args: list[str], cpu: int | None = 0,
             code: Path | None = None) -> tuple[float, float, int, str]:
    """Run ``batcher ARGS`` (``code``: from that checkout instead of this one); (wall s,
    peak RSS MB, exit code, stderr tail)."""
    import resource

    cmd = [sys.executable, "-c", WRAP, *args]
    if cpu is not None:
        cmd = pinned(cpu, cmd)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          cwd=code)  # `python -c` imports batcher from its working folder
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    lines = proc.stderr.strip().splitlines()
    rss = int(lines[-1]) / 1024 * 1.048576 if lines and lines[-1].isdigit() else float("nan")
    return wall, rss, proc.returncode, "\n".join(lines[-5:])


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def report(kind: str, peaks: dict[int, float], fitted: bool) -> None:
    if 1_000_000 not in peaks or 10_000_000 not in peaks:
        return
    big, one = peaks[10_000_000], peaks[1_000_000]
    how = " (10M fitted from the two largest sizes measured)" if fitted else ""
    print(f"{kind}: 10M peak {big:,.0f} MB < {LIMIT_MB:.0f} MB: {verdict(big < LIMIT_MB)}; "
          f"10M/1M = {big / one:.3f} <= {SLOPE}: {verdict(big / one <= SLOPE)}{how}")


def bench_run(tmp: Path, sizes: list[int]) -> None:
    peaks: dict[int, float] = {}
    with Simulator() as sim:
        for rows in sizes:
            src = make_input(tmp, rows)
            out = tmp / f"run-{rows}.parquet"
            # A state left by an earlier run (BENCH_DATA keeps the folder) would change what
            # this run does: start from nothing.
            shutil.rmtree(out.with_name(out.name + ".state"), ignore_errors=True)
            wall, rss, code, tail = measured(
                ["run", str(src), "-o", str(out), "--base-url", sim.base_url, "--model",
                 "gpt-4o-mini", "--no-progress", "--log-format", "json", "--concurrency", "64"])
            if code != 0:
                raise SystemExit(f"run {rows}: exit {code}\n{tail}")
            peaks[rows] = rss
            print(f"run: {rows:,} rows: peak RSS {rss:,.0f} MB, {wall:,.1f} s "
                  f"({rows / wall:,.0f} rows/s)", flush=True)
            out.unlink()
            for extra in tmp.glob(f"run-{rows}.*"):
                if extra.is_file():
                    extra.unlink()
                else:  # the state folder: the next run of this size starts afresh
                    shutil.rmtree(extra)
    fitted = 10_000_000 not in peaks
    if fitted and len(peaks) >= 2:
        (x0, y0), (x1, y1) = sorted(peaks.items())[-2:]
        slope = (y1 - y0) / (x1 - x0)
        peaks[10_000_000] = y1 + slope * (10_000_000 - x1)
        print(f"run: fitted slope {slope * 1e6:,.2f} MB per million rows -> 10M rows "
              f"~{peaks[10_000_000]:,.0f} MB")
    report("run", peaks, fitted)


def bench_estimate(tmp: Path, sizes: list[int]) -> None:
    peaks: dict[int, float] = {}
    for rows in sizes:
        src = make_input(tmp, rows)
        wall, rss, code, tail = measured(["estimate", str(src), "--model", "gpt-4o-mini",
                                          "--json"], cpu=None)
        if code != 0:
            raise SystemExit(f"estimate {rows}: exit {code}\n{tail}")
        peaks[rows] = rss
        print(f"estimate: {rows:,} rows: peak RSS {rss:,.0f} MB, {wall:,.1f} s "
              f"({CPU_SECONDS[-1]:,.1f} s CPU)", flush=True)
    report("estimate", peaks, fitted=False)


def bench_resume(tmp: Path, rows: int, pending: int = 1_000) -> None:
    import tests.perf.bench_resume as builder
    from batcher.config import make_config
    from batcher.runner import Runner
    from batcher.simulate import SimConfig, SimulatorThread

    src = make_input(tmp, rows)
    out = tmp / "resume.parquet"
    with SimulatorThread(SimConfig()) as sim:
        config = make_config({"input": src, "output": out, "model": "gpt-4o-mini",
                              "base_url": sim.base_url})
        builder.FINGERPRINT = Runner(config)._fingerprint()
        t0 = time.perf_counter()
        builder.build(out, rows - pending, rows)
        print(f"resume: state with {rows - pending:,} done built in "
              f"{time.perf_counter() - t0:,.0f} s", flush=True)
        cmd = [sys.executable, "-c", WRAP, "run", str(src), "-o", str(out), "--base-url",
               sim.base_url, "--model", "gpt-4o-mini", "--no-progress", "--log-format", "json"]
        code, stderr, first, total = time_first_request(cmd, sim)
        lines = stderr.strip().splitlines()
        if code not in (0, 1):  # 1: the built state holds 1% error rows
            raise SystemExit(stderr[-2000:])
        rss = int(lines[-1]) / 1024 * 1.048576
        first_ok = first is not None and first < 10
        print(f"resume: {rows:,} rows, {rows - pending:,} done: first request after "
              f"{first if first is not None else float('nan'):.1f} s (< 10 s: "
              f"{verdict(first_ok)}), {sim.stats.requests:,} sent, whole run incl. finalize "
              f"{total:,.1f} s, peak RSS {rss:,.0f} MB (< {LIMIT_MB:.0f} MB: "
              f"{verdict(rss < LIMIT_MB)})")


def make_long_input(folder: Path, rows: int) -> Path:
    """Rows of ~800-character prompts (varied words, so the tokenizer's cache does not help)."""
    import random

    path = folder / f"long-{rows}.jsonl"
    if path.exists():
        return path
    text = ("the quick brown fox jumps over lazy dog classify this review as positive or "
            "negative sentiment product arrived late but works great customer support was "
            "helpful néanmoins 价格 合理 shipping box damaged refund quality")
    words = text.split()
    rng = random.Random(1)
    with path.open("wb") as f:
        for start in range(0, rows, 10_000):
            lines = []
            for i in range(start, min(rows, start + 10_000)):
                text = " ".join(rng.choices(words, k=130))[:800]
                lines.append(b'{"id":"row-%08d","prompt":"%s"}\n' % (i, text.encode()))
            f.write(b"".join(lines))
    return path


def bench_dryrun(tmp: Path, rows: int, target_s: float = 10.0, runs: int = 3) -> None:
    """``batcher estimate`` of ``rows`` ~800-character prompts, ``runs`` times; with
    ``BENCH_BASE=CHECKOUT`` in the environment, that checkout's code is run too, alternating
    with this one (a before/after pair measured in the same minutes)."""
    src = make_long_input(tmp, rows)
    base = os.environ.get("BENCH_BASE")
    codes: list[tuple[str, Path | None]] = [("this", None)]
    if base:
        codes.append(("base", Path(base)))
    walls: dict[str, list[float]] = {name: [] for name, _ in codes}
    cpus: dict[str, list[float]] = {name: [] for name, _ in codes}
    for _ in range(runs):
        for name, code in codes:
            load = os.getloadavg()[0]
            wall, rss, rc, tail = measured(["estimate", str(src), "--model", "gpt-4o-mini",
                                            "--json"], cpu=None, code=code)
            if rc != 0:
                raise SystemExit(f"estimate ({name}): exit {rc}\n{tail}")
            walls[name].append(wall)
            cpus[name].append(CPU_SECONDS[-1])
            print(f"dryrun ({name}): {rows:,} rows of ~800 characters: {wall:,.1f} s wall, "
                  f"{CPU_SECONDS[-1]:,.1f} s CPU (user+sys), peak RSS {rss:,.0f} MB, "
                  f"load {load:.1f} before", flush=True)
    for name, _ in codes:
        w, c = walls[name], cpus[name]
        print(f"dryrun ({name}): best {min(w):,.1f} s wall (range {min(w):,.1f}-{max(w):,.1f} s),"
              f" CPU {min(c):,.1f}-{max(c):,.1f} s; < {target_s:g} s: "
              f"{verdict(min(w) < target_s)}")


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    sizes = [int(a) for a in sys.argv[2:]]
    keep = os.environ.get("BENCH_DATA")  # a folder that keeps the generated inputs
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(keep) if keep else Path(d)
        if which in ("estimate", "all"):
            bench_estimate(tmp, sizes or [100_000, 1_000_000, 10_000_000])
        if which in ("resume", "all"):
            bench_resume(tmp, sizes[0] if sizes else 10_000_000)
        if which in ("dryrun", "all"):
            bench_dryrun(tmp, sizes[0] if sizes else 1_000_000)
        if which in ("run", "all"):
            bench_run(tmp, sizes or [100_000, 1_000_000])


if __name__ == "__main__":
    main()
