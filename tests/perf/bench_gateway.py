"""`batcher run` behind a strict gateway limiter: Debian's nginx with `limit_req`, no burst (issue 18).

    python tests/perf/bench_gateway.py             # rpm, then discover
    python tests/perf/bench_gateway.py rpm         # --rpm 1100 under a 1,200/min (20r/s) limiter
    python tests/perf/bench_gateway.py discover    # no --rpm: batcher must find the limit itself
    python tests/perf/bench_gateway.py rpm --rows 2000 --timeout 120 --keep-log /tmp/gw

The gateway is a real nginx (`apt-get install -y nginx`; exit 2 when /usr/sbin/nginx is missing)
run in the foreground from a temp dir (config, pid, logs and temp paths all in it) on a free
127.0.0.1 port, pinned to CPU 1; batcher runs pinned to CPU 0 with no API key (loopback needs
none). nginx admits one request per 50 ms since the last admitted one (refusals do not move
that clock) and answers the others 429 with its HTML page and no Retry-After: what many
gateways in front of LLM APIs do. The admitted ones get a fixed chat.completion.

`return` in the limited location itself would answer in nginx's rewrite phase, before
`limit_req` (preaccess phase) ever runs, so nothing would be limited: the limited location
hands over to a named location with `try_files`, which runs after preaccess.

The access log records `$msec $status` per request, from which the figures are computed; each
run is bounded by a timeout. Each mode prints its figures and targets; exit 1 when one is missed.
Run from the repository root.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script
from tests.perf.bench_limits import check, free_port, make_input, pinned, summary_of

ROOT = Path(__file__).resolve().parents[2]
NGINX = Path("/usr/sbin/nginx")
GATEWAY_RATE = 20  # requests per second: 1,200/min
GATEWAY_RPM = GATEWAY_RATE * 60
RUN_TIMEOUT_S = 300.0
"""Each run is stopped (SIGTERM) after this long; ``--timeout`` changes it."""

ANSWER = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fruit"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 14, "completion_tokens": 1, "total_tokens": 15},
}).decode()

CONFIG = """\
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format timed '$msec $status';
    access_log {tmp}/access.log timed;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000;
{zone}    server {{
        listen 127.0.0.1:{port};
        location = /v1/chat/completions {{
{limit}            try_files /nonexistent @answer;
        }}
        location @answer {{
            default_type application/json;
            return 200 '{answer}';
        }}
        location / {{
            default_type application/json;
            return 404 '{{"error": {{"message": "not found", "type": "invalid_request_error"}}}}';
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground (``daemon off``, one process) with its config, pid, logs and
    temp paths in ``tmp``, on a free loopback port; stopped on leaving the ``with`` block.
    ``rate`` None: no limiter, every request answered at once (the throughput benchmark's
    zero-cost server)."""

    def __init__(self, tmp: Path, rate: int | None = GATEWAY_RATE) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.access_log = tmp / "access.log"
        conf = tmp / "nginx.conf"
        zone = limit = ""
        if rate is not None:
            zone = (f"    limit_req_zone $binary_remote_addr zone=gateway:1m rate={rate}r/s;\n"
                    "    limit_req_log_level warn;\n")
            limit = "            limit_req zone=gateway;\n            limit_req_status 429;\n"
        conf.write_text(CONFIG.format(tmp=tmp, port=self.port, zone=zone, limit=limit,
                                      answer=ANSWER))
        cmd = [str(NGINX), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]
        self.proc = subprocess.Popen(pinned(1, cmd), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"nginx did not start: {err.strip()}") from None
                time.sleep(0.05)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> list[tuple[float, int]]:
        """(time in seconds, status) of every request nginx answered, in log order."""
        rows = []
        for line in self.access_log.read_text().splitlines():
            msec, status = line.split()
            rows.append((float(msec), int(status)))
        return rows

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_client(src: Path, out: Path, base_url: str, *extra: str,
               timeout: float) -> tuple[int | None, float, str]:
    """`batcher run` pinned to CPU 0 with no OPENAI_API_KEY; (exit code, or None when it was
    stopped at ``timeout`` (SIGTERM, then SIGKILL after 30 s), wall seconds, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BATCHER_BASE_URL")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = pinned(0, [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out),
                     "--base-url", base_url, "--model", "gpt-4o-mini", "--no-progress", *extra])
    started = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
            proc.terminate()  # batcher flushes its state on SIGTERM
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
    return code, time.perf_counter() - started, stderr


def rows_ok(out: Path) -> int:
    if not out.exists():
        return 0
    statuses = pq.read_table(out, columns=["status"]).column("status").to_pylist()
    return sum(1 for s in statuses if s == "ok")


def pacing(log: list[tuple[float, int]]) -> list[str]:
    """Lines on how the client paced its sends, as nginx saw them (not held to a target)."""
    if not log:
        return ["  pacing: nginx logged no request"]
    times = [t for t, _ in log]
    t0 = times[0]
    first_second = Counter(status for t, status in log if t - t0 < 1.0)
    lines = [f"  pacing: first second {sum(first_second.values())} requests "
             f"({first_second.get(200, 0)} admitted, {first_second.get(429, 0)} refused); "
             f"first 10 sends at +{', +'.join(f'{(t - t0) * 1000:.0f}' for t in times[:10])} ms"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if gaps:
        lines.append(f"  pacing: gap between sends median {statistics.median(gaps) * 1000:.0f} ms, "
                     f"smallest {min(gaps) * 1000:.0f} ms, largest {max(gaps) * 1000:.0f} ms")
    after_429 = [log[i + 1][0] - t for i, (t, status) in enumerate(log[:-1]) if status == 429]
    if after_429:
        lines.append(f"  pacing: after a 429 the next send came after median "
                     f"{statistics.median(after_429) * 1000:.0f} ms (largest "
                     f"{max(after_429) * 1000:.0f} ms); "
                     f"{sum(1 for g in after_429 if g < 0.005)} of {len(after_429)} within 5 ms")
    return lines


def bench(tmp: Path, mode: str, rows: int, timeout: float, keep_log: Path | None) -> bool:
    extra = ("--rpm", "1100") if mode == "rpm" else ()
    src = make_input(tmp, rows)
    out = tmp / f"{mode}.parquet"
    with Nginx(tmp) as nginx:
        code, wall, stderr = run_client(src, out, nginx.base_url, *extra, timeout=timeout)
        nginx.stop()
        log = nginx.log()
        if keep_log is not None:
            shutil.copyfile(nginx.access_log, keep_log.with_name(f"{keep_log.name}.{mode}.log"))
    ok = rows_ok(out)
    requests = len(log)
    statuses = Counter(status for _, status in log)
    refused = statuses.get(429, 0)
    share_429 = refused / max(1, requests)
    summary_path = out.with_name(out.stem + ".summary.json")
    summary = summary_of(out) if summary_path.exists() else {}
    duration = float(summary.get("duration_s", wall))
    delivered = statuses.get(200, 0) / duration * 60 if duration > 0 else 0.0
    admitted = sorted(t for t, status in log if status == 200)
    gaps = [b - a for a, b in itertools.pairwise(admitted)]
    span = admitted[-1] - log[0][0] if admitted else 0.0
    outcome = f"stopped at the {timeout:.0f} s timeout" if code is None else f"exit {code}"
    print(f"{mode}: {rows:,} rows, nginx limit_req rate={GATEWAY_RATE}r/s ({GATEWAY_RPM:,}/min), "
          f"no burst, no Retry-After; batcher {' '.join(extra) or 'without --rpm'}")
    print(f"  {outcome} after {duration:.2f} s (process {wall:.2f} s; ideal at the gateway's "
          f"rate {rows / GATEWAY_RPM * 60:.2f} s); rows ok {ok:,} / {rows:,}"
          + ("" if out.exists() else f" (no output written; answered before the stop: "
                                     f"{summary.get('ok', '?')})"))
    print(f"  requests {requests:,}, answered 429: {refused:,} ({share_429:.2%}); statuses "
          f"{dict(sorted(statuses.items()))}")
    print(f"  delivered {delivered:,.0f} successes/min over the run "
          f"(server side, first request to last success: "
          f"{statuses.get(200, 0) / span * 60 if span > 0 else 0:,.0f}/min)")
    if gaps:
        print(f"  smallest gap between two admitted requests {min(gaps) * 1000:.0f} ms "
              f"(the limiter's interval: {1000 / GATEWAY_RATE:.0f} ms)")
    for line in pacing(log):
        print(line)
    if code is not None and code not in (0, 1):
        print("  stderr (end): " + stderr[-1500:].replace("\n", "\n    "))
    results = [check("all rows ok", ok == rows)]
    if mode == "rpm":
        results += [check("<= 1% of requests answered 429", share_429 <= 0.01),
                    check(">= 95% of 1,100/min delivered", delivered >= 0.95 * 1100)]
    else:
        results += [check(f">= 70% of {GATEWAY_RPM:,}/min delivered",
                          delivered >= 0.70 * GATEWAY_RPM)]
    return all(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("modes", nargs="*", metavar="MODE", help="rpm, discover (default: both)")
    parser.add_argument("--rows", type=int, default=600, help="input rows (default 600)")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S,
                        help=f"stop each run after this many seconds (default {RUN_TIMEOUT_S:.0f})")
    parser.add_argument("--keep-log", type=Path, metavar="PREFIX",
                        help="copy nginx's access log of each mode to PREFIX.MODE.log")
    args = parser.parse_args()
    unknown = [m for m in args.modes if m not in ("rpm", "discover")]
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; choose from rpm, discover")
    if not NGINX.exists():
        print(f"{NGINX} is missing: this benchmark needs Debian's nginx "
              "(as root: apt-get install -y nginx)", file=sys.stderr)
        return 2
    all_ok = True
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as d:
        for mode in args.modes or ["rpm", "discover"]:
            folder = Path(d) / mode
            folder.mkdir()
            all_ok = bench(folder, mode, args.rows, args.timeout, args.keep_log) and all_ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
