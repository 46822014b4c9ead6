"""--engine ray benchmarks on the simulator (a plain script; prints figures and targets).

    python tests/perf/bench_ray.py                # throughput and rate
    python tests/perf/bench_ray.py throughput     # rows/s with 1, 2, 4 actors (and live) on a fast server
    python tests/perf/bench_ray.py rate           # 4 actors, 6,000 RPM both sides, per-second slices
    python tests/perf/bench_ray.py strict         # 4 actors, --rpm 2500, server --strict-rpm 3000 (nginx)
    python tests/perf/bench_ray.py strict4k       # the same at --rpm 3800, server --strict-rpm 4500

Needs ``pip install -e '.[ray]'``. Each ``batcher run --engine ray`` starts its own local Ray
(``ray.init()``), so every figure is for the sending only: from the log line at which the
actors are ready (``ray_actors_ready``) to the last answer (``ray_sending_done``); the
start-up (Ray and the actors) is printed apart. Nothing is pinned: Ray's actors share the
machine's CPUs with the simulator. The strict scenarios give the client an ``--rpm`` a little
below the gateway's rate, as the README advises for any strict limiter (one late wake-up may
catch up a millisecond), and are bounded by a timeout: a run still going then is stopped
(SIGTERM: the driver stops its Ray) and reported unfinished, with the simulator's counts.
Run from the repository root.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_limits import (  # a sibling script, not a package
    KEY,
    ROOT,
    Simulator,
    _env,
    check,
    exactly_once,
    make_input,
    run_client,
    run_scenarios,
)


def _when(stderr: str, event: str) -> float | None:
    for line in stderr.splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            stamp = json.loads(line)["timestamp"].replace("Z", "+00:00")
            return datetime.fromisoformat(stamp).timestamp()
    return None


def _sending(stderr: str, wall: float) -> tuple[float, float]:
    """(seconds spent sending, seconds of start-up) of one run, from its JSON log."""
    ready, started, done = (_when(stderr, e) for e in ("ray_actors_ready", "run_started",
                                                        "ray_sending_done"))
    done = done or _when(stderr, "run_finished")
    if done is None:
        return wall, 0.0
    begin = ready if ready is not None else started
    assert begin is not None and started is not None
    return done - begin, begin - started


def bench_throughput(tmp: Path, rows: int = 6_000) -> bool:
    results = []
    with Simulator("--latency-ms", "5") as sim:
        src = make_input(tmp, rows)
        print(f"throughput: {rows:,} rows, simulator at 5 ms latency, --concurrency 64 per "
              f"actor (2 CPUs shared by the driver, the actors and the simulator)")
        for label, extra in [("live", ()), ("ray, 1 actor", ("--ray-actors", "1")),
                             ("ray, 2 actors", ("--ray-actors", "2")),
                             ("ray, 4 actors", ("--ray-actors", "4"))]:
            out = tmp / f"{label.replace(' ', '').replace(',', '-')}.parquet"
            engine = ("--engine", "ray", *extra) if extra else ()
            code, wall, stderr = run_client(src, out, sim.base_url, "--concurrency", "64",
                                            *engine, pinned_cpu=None)
            sending, startup = _sending(stderr, wall)
            if code not in (0, 1) or not out.exists():
                print(stderr[-3000:])
                results.append(check(f"{label}: exit 0", False))
                continue
            once, duplicates, statuses = exactly_once(out, rows)
            print(f"  {label:<14} {rows / sending:>7,.0f} rows/s  (sending {sending:.2f} s, "
                  f"start-up {startup:.2f} s, exit {code}, duplicates {duplicates})")
            results.append(check(f"{label}: exit 0, every row exactly once, all ok",
                                 code == 0 and once and statuses == {"ok": rows}))
    return all(results)


def _run_bounded(src: Path, out: Path, base_url: str, *extra: str, timeout: float
                 ) -> tuple[int | None, float, str]:
    """Like ``run_client`` (not pinned), but a run still going after ``timeout`` seconds is
    stopped with SIGTERM (so that it stops the Ray it started) and its code is None."""
    command = [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out),
               "--base-url", base_url, "--model", "gpt-4o-mini", "--no-progress",
               "--log-format", "json", *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(OPENAI_API_KEY=KEY),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, time.perf_counter() - started, stderr
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        return None, time.perf_counter() - started, stderr


def bench_rate(tmp: Path, rows: int = 3_000, limit: int = 6_000, actors: int = 4,
               strict: bool = False, rpm: int | None = None, timeout: float = 600.0) -> bool:
    """``rows`` at ``--rpm rpm`` (default: the server's ``limit``) with ``actors`` actors, the
    server limiting in per-second slices or (``strict``) as an interval limiter."""
    rpm = rpm or limit
    server = ("--strict-rpm" if strict else "--rpm", str(limit))
    with Simulator(*server, "--latency-ms", "150") as sim:
        src = make_input(tmp, rows)
        out = tmp / "rate.parquet"
        code, wall, stderr = _run_bounded(src, out, sim.base_url, "--rpm", str(rpm),
                                          "--engine", "ray", "--ray-actors", str(actors),
                                          "--concurrency", "64", timeout=timeout)
        stats = sim.stats()
    kind = "an nginx-like interval limiter (--strict-rpm)" if strict else "per-second slices"
    print(f"{'strict' if strict else 'rate'}: {rows:,} rows, {actors} actors, client --rpm "
          f"{rpm:,}, server {limit:,} RPM ({kind}), 150 ms latency")
    refused = stats["strict_refused"] if strict else stats["rate_limited"]
    share_429 = refused / max(1, stats["requests"])
    if code is None:
        admitted = stats["requests"] - refused
        print(f"  unfinished after the {timeout:.0f} s timeout: {admitted:,} of {rows:,} "
              f"admitted ({admitted / wall * 60:,.0f}/min incl. start-up = "
              f"{admitted / wall * 60 / rpm:.1%} of --rpm); requests {stats['requests']:,}, "
              f"answered 429: {refused} ({share_429:.2%})")
        return check("finished", False)
    if code != 0:
        print(stderr[-2000:])
    sending, startup = _sending(stderr, wall)
    rate = rows / sending * 60
    once, duplicates, statuses = exactly_once(out, rows)
    print(f"  achieved {rate:,.0f} RPM = {rate / rpm:.1%} of --rpm (sending {sending:.2f} s, "
          f"ideal {rows / rpm * 60:.2f} s; start-up {startup:.2f} s)")
    print(f"  requests {stats['requests']:,}, answered 429: {refused} ({share_429:.2%}); "
          f"statuses {dict(statuses)}; duplicates {duplicates}")
    results = [check("exit 0", code == 0),
               check("achieved >= 97% of --rpm", rate >= 0.97 * rpm),
               check("<= 1% of requests answered 429", share_429 <= 0.01),
               check("every row exactly once, all ok", once and statuses == {"ok": rows})]
    return all(results)


def bench_strict(tmp: Path) -> bool:
    return bench_rate(tmp, rows=1_500, limit=3_000, rpm=2_500, strict=True, timeout=300.0)


def bench_strict4k(tmp: Path) -> bool:
    return bench_rate(tmp, rows=2_400, limit=4_500, rpm=3_800, strict=True, timeout=300.0)


SCENARIOS: dict[str, Callable[[Path], bool]] = {
    "throughput": bench_throughput, "rate": bench_rate, "strict": bench_strict,
    "strict4k": bench_strict4k}


def main() -> int:
    return run_scenarios(SCENARIOS, ["throughput", "rate"])


if __name__ == "__main__":
    sys.exit(main())
