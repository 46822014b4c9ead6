"""Rate-limit, fault and abort benchmarks of `batcher run` on the simulator (a plain script; prints figures).

    python tests/perf/bench_limits.py            # rpm, faults, abort
    python tests/perf/bench_limits.py rpm        # 6,000 RPM both sides, per-second slices, 150 ms, 3,000 rows
    python tests/perf/bench_limits.py rpm3       # the same, 3 minutes (18,000 rows): >= 99%, no 429
    python tests/perf/bench_limits.py rpm5xx     # 3 minutes at the limit with 5% 5xx: >= 94% as successes
    python tests/perf/bench_limits.py faults     # 5% 5xx, 1% drops, 1% invalid JSON, 0.5% hangs
    python tests/perf/bench_limits.py abort      # wrong key / exhausted quota on a 5,000-row job
    python tests/perf/bench_limits.py storm      # extra: no --rpm, a 600 RPM server, 50 workers

The simulator runs as its own process (`python -m batcher simulate`) pinned to CPU 1, the
client as another pinned to CPU 0 (taskset, when there are two CPUs), both on 127.0.0.1;
the simulator's counters are read over HTTP (``GET /_stats``) at the end. Each scenario
prints its figures and the targets it is held to; the exit status is 1 when one is missed.
Run from the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-bench-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu), *cmd]
    return cmd


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BATCHER_BASE_URL")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class Simulator:
    """``python -m batcher simulate ARGS`` on a free port, pinned to CPU 1."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            pinned(1, [sys.executable, "-m", "batcher", "simulate", "--port", str(self.port),
                       *args]),
            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"simulator {' '.join(args)} did not start") from None
                time.sleep(0.05)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=10) as r:
            stats: dict[str, Any] = json.loads(r.read())
            return stats

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_input(folder: Path, rows: int) -> Path:
    path = folder / f"in-{rows}.jsonl"
    with path.open("wb") as f:
        for i in range(rows):
            f.write(orjson.dumps({"id": f"row-{i:08d}",
                                  "prompt": f"Classify item {i}: is it a fruit or a tool?"}))
            f.write(b"\n")
    return path


def run_client(src: Path, out: Path, base_url: str, *extra: str,
               key: str = KEY, pinned_cpu: int | None = 0) -> tuple[int, float, str]:
    """`batcher run` pinned to CPU ``pinned_cpu`` (None: not pinned); (exit code, wall
    seconds incl. start-up, stderr)."""
    command = [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out),
               "--base-url", base_url, "--model", "gpt-4o-mini", "--no-progress",
               "--log-format", "json", *extra]
    cmd = command if pinned_cpu is None else pinned(pinned_cpu, command)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(OPENAI_API_KEY=key), capture_output=True,
                          text=True, check=False)
    return proc.returncode, time.perf_counter() - started, proc.stderr


def summary_of(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(
        out.with_name(out.name.removesuffix(".parquet") + ".summary.json").read_text())
    return summary


def exactly_once(out: Path, rows: int) -> tuple[bool, int, Counter[str]]:
    """(every input id exactly once, duplicate ids, statuses) of an output."""
    table = pq.read_table(out, columns=["id", "status"])
    ids = table.column("id").to_pylist()
    expected = {f"row-{i:08d}" for i in range(rows)}
    duplicates = len(ids) - len(set(ids))
    statuses: Counter[str] = Counter(str(s) for s in table.column("status").to_pylist())
    return duplicates == 0 and set(ids) == expected, duplicates, statuses


def check(label: str, ok: bool) -> bool:
    print(f"  {'PASS' if ok else 'MISS'}  {label}")
    return ok


# --- scenarios ----------------------------------------------------------------------------


def bench_rpm(tmp: Path, rows: int = 3_000, limit: int = 6_000, *, least: float = 0.97,
              most_429: float = 0.01, fail_rate: float = 0.0) -> bool:
    faults = ("--fail-rate", str(fail_rate), "--seed", "7") if fail_rate else ()
    with Simulator("--rpm", str(limit), "--latency-ms", "150", *faults) as sim:
        src = make_input(tmp, rows)
        out = tmp / "rpm.parquet"
        code, wall, stderr = run_client(src, out, sim.base_url, "--rpm", str(limit))
        stats = sim.stats()
    if code != 0:
        print(stderr[-2000:])
    duration = float(summary_of(out)["duration_s"])
    rate = rows / duration * 60  # successes: every row is answered ok once
    share_429 = stats["rate_limited"] / max(1, stats["requests"])
    once, duplicates, statuses = exactly_once(out, rows)
    print(f"rpm: {rows:,} rows, server and client at {limit:,} RPM (server: per-second "
          f"slices), 150 ms latency" + (f", {fail_rate:.0%} answered 500" if fail_rate else ""))
    print(f"  achieved {rate:,.0f} successes/min = {rate / limit:.2%} of the limit (run "
          f"{duration:.2f} s, ideal {rows / limit * 60:.2f} s; process {wall:.2f} s)")
    print(f"  requests {stats['requests']:,}, answered 429: {stats['rate_limited']} "
          f"({share_429:.2%}); statuses {dict(statuses)}; duplicates {duplicates}; "
          f"max in flight at the server {stats['max_in_flight']}")
    results = [check("exit 0", code == 0),
               check(f"achieved >= {least:.0%} of the limit", rate >= least * limit),
               check(f"<= {most_429:.0%} of requests answered 429" if most_429 else
                     "no request answered 429", share_429 <= most_429),
               check("every row exactly once, all ok", once and statuses == {"ok": rows})]
    if fail_rate:
        # A retry takes the pacer's next free slot ahead of the rows waiting: it reaches the
        # server within a few of the limit's intervals of its 500, not a backoff later.
        delays, slot_ms = stats["retry_delay_ms"], 60_000 / limit
        print(f"  retries reached the server {delays['p50']} ms after their 500 (median; p90 "
              f"{delays['p90']}, max {delays['max']} ms; {delays['count']:,} retries); one "
              f"slot is {slot_ms:g} ms")
        results.append(check(f"retries take the next free slot: median <= 3 slots "
                             f"({3 * slot_ms:g} ms)", delays["count"] > 0
                             and delays["p50"] <= 3 * slot_ms))
    return all(results)


def bench_faults(tmp: Path, rows: int = 3_000) -> bool:
    # 5% 5xx (3% plain 500, 2% Cloudflare 524 pages), 1% dropped connections, 1% 200s
    # with a body that is not JSON, 0.5% requests that never get an answer.
    args = ("--latency-ms", "50", "--fail-rate", "0.03", "--rate-524", "0.02",
            "--rate-drop", "0.01", "--rate-invalid-json", "0.01", "--rate-hang", "0.005",
            "--seed", "7")
    with Simulator(*args) as sim:
        src = make_input(tmp, rows)
        out = tmp / "faults.parquet"
        code, wall, stderr = run_client(src, out, sim.base_url, "--timeout", "3")
        stats = sim.stats()
    if code != 0:
        print(stderr[-2000:])
    summary = summary_of(out)
    once, duplicates, statuses = exactly_once(out, rows)
    attempts = Counter(pq.read_table(out, columns=["attempts"]).column("attempts").to_pylist())
    print(f"faults: {rows:,} rows, 50 ms latency, --timeout 3: faults injected "
          f"{dict(sorted(stats['faults'].items()))}")
    print(f"  rows ok {statuses.get('ok', 0):,} / {rows:,}; errors {statuses.get('error', 0)}; "
          f"duplicates {duplicates}; requests {stats['requests']:,} "
          f"(ok answers {stats['ok']:,}); resent_after_ok {stats['resent_after_ok']}")
    print(f"  attempts per row {dict(sorted(attempts.items()))}; run {summary['duration_s']:.2f} s "
          f"(process {wall:.2f} s)")
    results = [check("exit 0", code == 0),
               check("every row ok, exactly once", once and statuses == {"ok": rows}),
               check("one paid answer per row (server ok == rows)", stats["ok"] == rows),
               check("resent_after_ok == 0", stats["resent_after_ok"] == 0)]
    return all(results)


def bench_abort(tmp: Path, rows: int = 5_000) -> bool:
    src = make_input(tmp, rows)
    results = []
    print(f"abort: {rows:,}-row job, default concurrency")
    for label, args in (("wrong key", ("--require-key", "sk-the-right-one")),
                        ("exhausted quota", ("--quota-exhausted",))):
        with Simulator(*args) as sim:
            out = tmp / f"abort-{label.replace(' ', '-')}.parquet"
            code, wall, stderr = run_client(src, out, sim.base_url)
            stats = sim.stats()
        message = summary_of(out).get("message")
        leaked = KEY in stderr or KEY in (out.parent / (out.stem + ".summary.json")).read_text()
        print(f"  {label}: exit {code} after {wall:.2f} s (process start to exit), "
              f"{stats['requests']} requests sent; message: {message}")
        results += [check(f"{label}: exit 3", code == 3),
                    check(f"{label}: within 15 s", wall <= 15),
                    check(f"{label}: at most 100 requests", stats["requests"] <= 100),
                    check(f"{label}: key not in stderr or summary", not leaked)]
    return all(results)


def bench_storm(tmp: Path, rows: int = 200, limit: int = 600) -> bool:
    """Not a stated target: how a pool with no --rpm copes with a server's per-second limit."""
    with Simulator("--rpm", str(limit), "--latency-ms", "20") as sim:
        src = make_input(tmp, rows)
        out = tmp / "storm.parquet"
        code, _, _ = run_client(src, out, sim.base_url, "--concurrency", "50")
        stats = sim.stats()
    duration = float(summary_of(out)["duration_s"])
    once, duplicates, statuses = exactly_once(out, rows)
    share_429 = stats["rate_limited"] / max(1, stats["requests"])
    print(f"storm: {rows} rows, server {limit} RPM in per-second slices, 20 ms, client without "
          f"--rpm, --concurrency 50")
    print(f"  exit {code}; statuses {dict(statuses)}; duplicates {duplicates}; requests "
          f"{stats['requests']}, 429s {stats['rate_limited']} ({share_429:.0%}); run "
          f"{duration:.2f} s (ideal {rows / limit * 60:.1f} s)")
    results = [check("every row ok (no row lost to a storm of the pool's making)",
                     once and statuses == {"ok": rows}),
               check("429s fewer than rows", stats["rate_limited"] < rows)]
    return all(results)


def bench_rpm3(tmp: Path) -> bool:
    return bench_rpm(tmp, rows=18_000, least=0.99, most_429=0.0)


def bench_rpm5xx(tmp: Path) -> bool:
    return bench_rpm(tmp, rows=17_000, least=0.94, most_429=0.0, fail_rate=0.05)


SCENARIOS = {"rpm": bench_rpm, "rpm3": bench_rpm3, "rpm5xx": bench_rpm5xx,
             "faults": bench_faults, "abort": bench_abort, "storm": bench_storm}


def run_scenarios(scenarios: dict[str, Callable[[Path], bool]], default: list[str]) -> int:
    """Run the scenarios named on the command line (else ``default``), each in its own
    temporary folder; exit status 0 when every one met its targets, 1 if not, 2 for an
    unknown name."""
    names = sys.argv[1:] or default
    unknown = [n for n in names if n not in scenarios]
    if unknown:
        print(f"unknown scenario {unknown[0]!r}; choose from {', '.join(scenarios)}",
              file=sys.stderr)
        return 2
    all_ok = True
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            folder = Path(d) / name
            folder.mkdir()
            all_ok = scenarios[name](folder) and all_ok
    return 0 if all_ok else 1


def main() -> int:
    return run_scenarios(SCENARIOS, ["rpm", "faults", "abort"])


if __name__ == "__main__":
    sys.exit(main())
