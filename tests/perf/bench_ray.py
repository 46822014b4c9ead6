"""--engine ray benchmarks on the simulator (a plain script; prints figures and targets).

    python tests/perf/bench_ray.py                # throughput and rate
    python tests/perf/bench_ray.py throughput     # rows/s with 1, 2, 4 actors (and live) on a fast server
    python tests/perf/bench_ray.py rate           # 4 actors, 6,000 RPM both sides, per-second slices
    python tests/perf/bench_ray.py strict         # extra: 4 actors against --strict-rpm 3000 (nginx)

Needs ``pip install -e '.[ray]'``. Each ``batcher run --engine ray`` starts its own local Ray
(``ray.init()``), so every figure is for the sending only: from the log line at which the
actors are ready (``ray_actors_ready``) to the last answer (``ray_sending_done``); the
start-up (Ray and the actors) is printed apart. Nothing is pinned: Ray's actors share the
machine's CPUs with the simulator.
Run from the repository root.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_limits import (  # a sibling script, not a package
    Simulator,
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


def bench_rate(tmp: Path, rows: int = 3_000, limit: int = 6_000, actors: int = 4,
               strict: bool = False) -> bool:
    server = ("--strict-rpm" if strict else "--rpm", str(limit))
    with Simulator(*server, "--latency-ms", "150") as sim:
        src = make_input(tmp, rows)
        out = tmp / "rate.parquet"
        code, wall, stderr = run_client(src, out, sim.base_url, "--rpm", str(limit),
                                        "--engine", "ray", "--ray-actors", str(actors),
                                        "--concurrency", "64", pinned_cpu=None)
        stats = sim.stats()
    if code != 0:
        print(stderr[-2000:])
    sending, startup = _sending(stderr, wall)
    rate = rows / sending * 60
    refused = stats["strict_refused"] if strict else stats["rate_limited"]
    share_429 = refused / max(1, stats["requests"])
    once, duplicates, statuses = exactly_once(out, rows)
    kind = "an nginx-like interval limiter (--strict-rpm)" if strict else "per-second slices"
    print(f"{'strict' if strict else 'rate'}: {rows:,} rows, {actors} actors, server and client "
          f"at {limit:,} RPM (server: {kind}), 150 ms latency")
    print(f"  achieved {rate:,.0f} RPM = {rate / limit:.1%} of the limit (sending {sending:.2f} s, "
          f"ideal {rows / limit * 60:.2f} s; start-up {startup:.2f} s)")
    print(f"  requests {stats['requests']:,}, answered 429: {refused} ({share_429:.2%}); "
          f"statuses {dict(statuses)}; duplicates {duplicates}")
    results = [check("exit 0", code == 0),
               check("achieved >= 97% of the limit", rate >= 0.97 * limit),
               check("<= 1% of requests answered 429", share_429 <= 0.01),
               check("every row exactly once, all ok", once and statuses == {"ok": rows})]
    return all(results)


def bench_strict(tmp: Path) -> bool:
    return bench_rate(tmp, rows=1_500, limit=3_000, strict=True)


SCENARIOS: dict[str, Callable[[Path], bool]] = {
    "throughput": bench_throughput, "rate": bench_rate, "strict": bench_strict}


def main() -> int:
    return run_scenarios(SCENARIOS, ["throughput", "rate"])


if __name__ == "__main__":
    sys.exit(main())
