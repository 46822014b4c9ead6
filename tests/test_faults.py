"""Faults end to end through the CLI: what is retried, what is not, hangs, storms, a dead server, secrets."""

from __future__ import annotations

import email.utils
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import Result

from batcher.simulate import SimulatorThread
from tests.conftest import ROOT, prompts, read_output, run_cli, write_jsonl

MakeSim = Callable[..., SimulatorThread]

RETRIED_STATUSES = (408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529)
NOT_RETRIED_STATUSES = (400, 404, 422)


def _run(base_url: str, src: Path, out: Path, *extra: str | Path,
         env: dict[str, str] | None = None) -> Result:
    return run_cli("run", src, "-o", out, "--base-url", base_url, "--model", "gpt-4o-mini",
                   "--no-progress", *extra, env=env)


def _summary(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(
        out.with_name(out.name.removesuffix(".parquet") + ".summary.json").read_text())
    return summary


def _by_id(out: Path) -> dict[str, dict[str, Any]]:
    rows = read_output(out)
    ids = [str(r["id"]) for r in rows]
    assert len(ids) == len(set(ids)), "an id appears twice in the output"
    return {str(r["id"]): r for r in rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- what is retried and what is not ------------------------------------------------------


@pytest.mark.parametrize("item", [
    # Advice of 10 ms keeps the test fast; 520–524 are Cloudflare HTML pages without any
    # retry header, so those wait a random backoff of at most 0.5 s.
    *(f"{s}:retry-after-ms=10" if s != 429 else "429:retry-after=0.01"
      for s in RETRIED_STATUSES),
    "drop", "invalid-json", "cut-stream", "hang",
])
def test_a_transient_fault_is_retried_and_the_row_ends_ok_on_attempt_2(
        tmp_path: Path, make_sim: MakeSim, item: str) -> None:
    sim = make_sim(script=(item,))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    out = tmp_path / "out.parquet"
    started = time.monotonic()
    # --timeout 1: the hung request is abandoned after a second, then sent again.
    result = _run(sim.base_url, src, out, "--concurrency", "1", "--timeout", "1")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.stderr
    [row] = read_output(out)
    assert row["status"] == "ok" and row["attempts"] == 2 and row["http_status"] == 200
    assert row["error"] is None and row["output"]
    assert sim.stats.requests == 2 and sim.stats.ok == 1
    kind = item.split(":")[0]
    assert sim.stats.faults == {kind: 1}
    assert elapsed < (4.0 if kind == "hang" else 3.0)
    if kind == "hang":
        assert row["wait_ms"] >= 1000             # the hung attempt was waited out, no more


@pytest.mark.parametrize("status", NOT_RETRIED_STATUSES)
def test_a_client_error_is_a_row_error_at_once_and_the_job_goes_on(
        tmp_path: Path, make_sim: MakeSim, status: int) -> None:
    sim = make_sim(script=(str(status),))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--concurrency", "1")
    assert result.exit_code == 1, result.stderr
    rows = _by_id(out)
    failed = rows.pop("r0")                      # concurrency 1: the first row met the script
    assert failed["status"] == "error" and failed["attempts"] == 1
    assert failed["http_status"] == status and str(status) in failed["error"]
    assert failed["error_type"] == "bad_request"
    assert [r["status"] for r in rows.values()] == ["ok", "ok"]
    assert sim.stats.requests == 3


@pytest.mark.parametrize("item", ["503:retry-after=0.7", "429:retry-after-ms=700"])
def test_the_servers_advised_wait_is_honoured(tmp_path: Path, make_sim: MakeSim,
                                              item: str) -> None:
    sim = make_sim(script=(item,))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--concurrency", "1")
    assert result.exit_code == 0, result.stderr
    [row] = read_output(out)
    assert row["attempts"] == 2
    # Not the random backoff (at most 0.5 s for a first retry) and not much more than told.
    assert 700 <= row["wait_ms"] < 700 * 1.1 + 600
    assert row["latency_ms"] < 700               # the answering send only, not the wait


def test_mixed_random_faults_every_row_ok_exactly_once_nothing_paid_twice(
        tmp_path: Path, make_sim: MakeSim) -> None:
    sim = make_sim(fail_rate=0.05, rate_524=0.02, rate_drop=0.02, rate_invalid_json=0.02,
                   rate_cut_stream=0.02, rate_hang=0.01, latency_ms=5, seed=11)
    rows = prompts(300)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--concurrency", "32", "--timeout", "1",
                  "--max-attempts", "10")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert sorted(got) == sorted(r["id"] for r in rows)
    assert all(r["status"] == "ok" for r in got.values())
    assert sum(sim.stats.faults.values()) > 20          # the faults did happen
    assert sim.stats.ok == len(rows)                    # one paid answer per row
    assert sim.stats.resent_after_ok == 0
    assert sum(r["attempts"] for r in got.values()) == sim.stats.requests


# --- 401/403/quota: stop at once ------------------------------------------------------------


@pytest.mark.parametrize("item", ["401", "403", "quota"])
def test_auth_or_quota_failure_stops_within_seconds_with_exit_3_and_resumes(
        tmp_path: Path, make_sim: MakeSim, item: str) -> None:
    sim = make_sim(script=(item,) * 200)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(500))
    out = tmp_path / "out.parquet"
    started = time.monotonic()
    result = _run(sim.base_url, src, out, "--concurrency", "8")
    assert time.monotonic() - started < 5
    assert result.exit_code == 3
    assert sim.stats.requests <= 16                     # not burning through the file
    reason = _summary(out)["message"]
    assert reason and (item in reason or "quota" in reason.lower())
    assert reason in " ".join(result.stderr.split())
    assert not out.exists() or all(r["status"] == "ok" for r in read_output(out))
    healthy = make_sim()
    result = _run(healthy.base_url, src, out)
    assert result.exit_code == 0, result.stderr
    assert len(_by_id(out)) == 500 and healthy.stats.requests == 500


@pytest.mark.parametrize("item", ["401", "403"])
def test_auth_failure_message_names_the_key_variable_to_fix(
        tmp_path: Path, make_sim: MakeSim, item: str) -> None:
    sim = make_sim(script=(item,) * 50)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(50))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--concurrency", "4", "--api-key-env", "TEAM_LLM_KEY",
                  env={"TEAM_LLM_KEY": "k-1"})
    assert result.exit_code == 3
    assert "TEAM_LLM_KEY" in result.stderr and "TEAM_LLM_KEY" in _summary(out)["message"]


# --- 429 storms: one global cooldown ------------------------------------------------------


class _Sampler:
    """Samples a simulator's counters every few milliseconds from a thread, timestamped."""

    def __init__(self, sim: SimulatorThread) -> None:
        self.samples: list[tuple[float, int, int]] = []     # (monotonic s, requests, 429s)
        self._sim = sim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stats = self._sim.stats
        while not self._stop.wait(0.005):
            self.samples.append((time.monotonic(), stats.requests, stats.by_status.get(429, 0)))

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_one_429_pauses_every_worker_for_the_advised_time(
        tmp_path: Path, make_sim: MakeSim) -> None:
    # 16 requests go out at once; the first to arrive is refused for 1 s. The 15 others
    # are answered; their workers must not send new rows until that second has passed.
    sim = make_sim(latency_ms=100, script=("429:retry-after=1",))
    rows, concurrency = 80, 16
    src = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    out = tmp_path / "out.parquet"
    with _Sampler(sim) as sampler:
        result = _run(sim.base_url, src, out, "--concurrency", str(concurrency))
    assert result.exit_code == 0, result.stderr
    assert len(_by_id(out)) == rows and sim.stats.requests == rows + 1
    refused_at, before = next((t, n) for t, n, refused in sampler.samples if refused)
    during = max(n for t, n, _ in sampler.samples if t <= refused_at + 0.9)
    # Only requests already past the gate when the 429 was answered (one per worker at
    # most) may arrive during the cooldown; hammering workers would send ~16 every 0.1 s.
    assert during - before <= concurrency - 1, (before, during)
    [refused] = [r for r in _by_id(out).values() if r["attempts"] == 2]
    assert refused["wait_ms"] >= 1000


def _cli_subprocess(args: list[str], timeout: float, env: dict[str, str] | None = None
                    ) -> tuple[int | None, float]:
    """Run ``python -m batcher ARGS``; (exit code or None when killed at ``timeout``, seconds)."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BATCHER_BASE_URL")}
    full_env.update(env or {})
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "batcher", *args], cwd=ROOT,
                              env=full_env, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - started
    return proc.returncode, time.monotonic() - started


def test_a_burst_of_bare_429s_is_one_cooldown_not_one_per_worker(
        tmp_path: Path, make_sim: MakeSim) -> None:
    # 8 workers refused at the same instant without any retry header: one signal, one
    # default cooldown (~1 s), not eight stacked ones.
    sim = make_sim(latency_ms=50, script=("429",) * 8)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(16))
    out = tmp_path / "out.parquet"
    code, elapsed = _cli_subprocess(
        ["run", str(src), "-o", str(out), "--base-url", sim.base_url, "--model", "m",
         "--no-progress", "--concurrency", "8"], timeout=30)
    assert code == 0, f"not finished after {elapsed:.1f} s"
    # The run itself (not the interpreter's start, slow on a loaded machine): one ~1 s
    # cooldown; eight stacked ones would take far longer.
    assert _summary(out)["duration_s"] < 4
    assert sim.stats.requests == 24


def test_a_rate_limited_server_without_client_limits_costs_no_row(
        tmp_path: Path, make_sim: MakeSim) -> None:
    # No --rpm given: the pool adapts. The server allows 20 requests per one-second slice
    # and 50 workers start at once, so ~30 are refused at first whatever the client does.
    # Every row must still end ok, at close to the server's rate, with refusals bounded
    # (a pool that ignored the advice would take thousands of 429s and lose rows).
    sim = make_sim(rpm=1200, latency_ms=20)
    rows = 80
    src = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--concurrency", "50")
    assert result.exit_code == 0, result.stderr
    assert all(r["status"] == "ok" for r in _by_id(out).values())
    assert sim.stats.ok == rows
    assert sim.stats.rate_limited < 2 * rows, sim.stats.rate_limited
    assert _summary(out)["duration_s"] < rows / 20 + 3


def test_tpm_at_the_servers_limit_is_respected_not_discovered(
        tmp_path: Path, make_sim: MakeSim) -> None:
    # 10,000 tokens per second slice; each request costs its ~9 prompt tokens + max_tokens.
    sim = make_sim(tpm=600_000, latency_ms=50)
    rows = 200
    src = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--tpm", "600000", "-p", "max_tokens=100",
                  "--concurrency", "32")
    assert result.exit_code == 0, result.stderr
    assert sim.stats.ok == rows
    assert sim.stats.rate_limited <= 0.01 * sim.stats.requests, sim.stats.rate_limited


# --- the server is down ------------------------------------------------------------------


@pytest.mark.parametrize("down", ["every-answer-500", "connection-refused"])
def test_a_dead_server_aborts_after_server_down_after_and_the_rerun_resumes(
        tmp_path: Path, make_sim: MakeSim, down: str) -> None:
    if down == "every-answer-500":
        base_url = make_sim(fail_rate=1.0).base_url
    else:
        base_url = f"http://127.0.0.1:{_free_port()}/v1"   # nothing listens there
    write_jsonl(tmp_path / "in.jsonl", prompts(200))
    job = tmp_path / "job.toml"
    # server_down_after has no CLI flag; a job file takes any RunConfig key.
    job.write_text('input = "in.jsonl"\noutput = "out.parquet"\nserver_down_after = 1\n'
                   'max_attempts = 50\nmodel = "gpt-4o-mini"\n')
    out = tmp_path / "out.parquet"
    started = time.monotonic()
    result = run_cli("run", job, "--base-url", base_url, "--no-progress", "--concurrency", "4")
    elapsed = time.monotonic() - started
    assert result.exit_code == 3, result.stderr
    assert elapsed < 8
    summary = _summary(out)
    assert summary["outcome"] == "aborted" and "down" in summary["message"]
    assert "down" in result.stderr
    # Nothing was burnt: no row was written off as an error while the server was down.
    assert summary["error"] == 0
    healthy = make_sim()
    result = run_cli("run", job, "--base-url", healthy.base_url, "--no-progress")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert len(got) == 200 and all(r["status"] == "ok" for r in got.values())
    assert healthy.stats.requests == 200


# --- rows that run out of attempts, then --retry-failed -----------------------------------


def test_rows_exhausting_attempts_keep_last_status_and_retry_failed_fixes_only_them(
        tmp_path: Path, make_sim: MakeSim) -> None:
    # Concurrency 1: script items meet the rows in order, two attempts per failing row.
    sim = make_sim(script=("500", "503", "ok", "hang", "hang", "invalid-json", "invalid-json",
                           "ok"))
    rows = prompts(6)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--concurrency", "1", "--max-attempts", "2",
                  "--timeout", "0.5")
    assert result.exit_code == 1, result.stderr
    first = _by_id(out)
    assert [first[f"r{i}"]["status"] for i in range(6)] == [
        "error", "ok", "error", "error", "ok", "ok"]
    http = first["r0"]
    assert http["attempts"] == 2 and http["http_status"] == 503 and "503" in http["error"]
    assert http["error_type"] == "server_error"
    hung = first["r2"]
    assert hung["attempts"] == 2 and hung["http_status"] is None
    assert hung["error_type"] == "transport_error" and hung["error"]
    garbled = first["r3"]
    assert garbled["attempts"] == 2 and garbled["http_status"] == 200
    assert garbled["error_type"] == "invalid_response" and "JSON" in garbled["error"]
    assert _summary(out)["error"] == 3

    healthy = make_sim()
    result = _run(healthy.base_url, src, out, "--retry-failed")
    assert result.exit_code == 0, result.stderr
    assert healthy.stats.requests == 3
    final = _by_id(out)
    assert sorted(final) == sorted(r["id"] for r in rows)
    assert all(r["status"] == "ok" and r["error"] is None for r in final.values())
    for i in ("r1", "r4", "r5"):                       # answers paid for earlier are kept
        assert final[i]["response_id"] == first[i]["response_id"]


# --- advice only a hand-written server sends: an HTTP date, x-ratelimit-reset-* ----------


Answer = tuple[int, dict[str, str], bytes]
"""(status, headers, body) of one scripted answer."""

CHAT_OK = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    answer: Callable[[int, str], Answer]
    """(request number from 0, the Authorization header) → the answer to send."""
    count = 0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server = self.server
        number, server.count = server.count, server.count + 1
        status, headers, body = server.answer(number, self.headers.get("Authorization", ""))
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[Callable[[Callable[[int, str], Answer]], str]]:
    """Start a loopback server answering by a function; returns its base URL."""
    servers: list[_Server] = []

    def start(answer: Callable[[int, str], Answer]) -> str:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.answer = answer
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _advice(kind: str) -> tuple[int, dict[str, str], float]:
    """(status, headers, least seconds they ask to wait) for each form of advice."""
    if kind == "retry-after-http-date":
        # An HTTP date has whole seconds: "2 s from now" asks for between 1 and 2 s.
        return 503, {"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)}, 1.0
    return 429, {"x-ratelimit-reset-requests": "900ms", "x-ratelimit-remaining-requests": "0",
                 "x-ratelimit-limit-requests": "60"}, 0.9


@pytest.mark.parametrize("kind", ["retry-after-http-date", "x-ratelimit-reset"])
def test_advice_as_http_date_or_ratelimit_reset_is_honoured(
        tmp_path: Path, http_server: Callable[[Callable[[int, str], Answer]], str],
        kind: str) -> None:
    def answer(number: int, _auth: str) -> Answer:
        if number == 0:
            status, headers, _ = _advice(kind)
            return status, headers, b'{"error": {"message": "later", "type": "server_error"}}'
        return 200, {}, CHAT_OK

    base_url = http_server(answer)
    _, _, least = _advice(kind)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    out = tmp_path / "out.parquet"
    result = _run(base_url, src, out, "--concurrency", "1")
    assert result.exit_code == 0, result.stderr
    [row] = read_output(out)
    assert row["status"] == "ok" and row["attempts"] == 2 and row["output"] == "fine"
    # The random backoff of a first retry is at most 0.5 s: only the advice explains this.
    assert least * 1000 - 50 <= row["wait_ms"] < 3500


@pytest.mark.parametrize("paced", [True, False])
def test_a_5xx_is_retried_without_waiting_for_the_rate_windows_reset(
        tmp_path: Path, http_server: Callable[[Callable[[int, str], Answer]], str],
        paced: bool) -> None:
    # OpenAI-style gateways put x-ratelimit-* on every answer, a 500 too: its reset says
    # when the rate window refills (20 s here), not when to retry the 500. Paced, the retry
    # takes the next slot at once; unpaced, it waits its random backoff (at most 0.5 s).
    arrivals: list[float] = []

    def answer(number: int, _auth: str) -> Answer:
        arrivals.append(time.monotonic())
        headers = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "598",
                   "x-ratelimit-reset-requests": "20s", "x-ratelimit-reset-tokens": "20s"}
        if number == 0:
            return 500, headers, b'{"error": {"message": "boom", "type": "server_error"}}'
        return 200, headers, CHAT_OK

    base_url = http_server(answer)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    out = tmp_path / "out.parquet"
    result = _run(base_url, src, out, "--concurrency", "1", *(("--rpm", "600") if paced else ()))
    assert result.exit_code == 0, result.stderr
    [row] = read_output(out)
    assert row["status"] == "ok" and row["attempts"] == 2 and row["output"] == "fine"
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] < (0.5 if paced else 1.5)


def test_ratelimit_remaining_at_zero_holds_the_next_send_until_the_reset(
        tmp_path: Path, http_server: Callable[[Callable[[int, str], Answer]], str]) -> None:
    arrivals: list[float] = []

    def answer(number: int, _auth: str) -> Answer:
        arrivals.append(time.monotonic())
        headers = {"x-ratelimit-limit-requests": "60", "x-ratelimit-reset-requests": "800ms",
                   "x-ratelimit-remaining-requests": "0" if number == 0 else "5"}
        return 200, headers, CHAT_OK

    base_url = http_server(answer)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    result = _run(base_url, src, out, "--concurrency", "1")
    assert result.exit_code == 0, result.stderr
    assert len(arrivals) == 3
    assert arrivals[1] - arrivals[0] >= 0.75          # held until the window resets
    assert arrivals[2] - arrivals[1] < 0.5            # and no longer than told


# --- the API key never leaks -------------------------------------------------------------


SECRET = "sk-test-Zq8vN3xW5pL1tK7m"


def _everything_written(result: Result, folder: Path) -> str:
    """stderr, stdout and every file under ``folder`` (Parquet files decoded to values)."""
    parts = [result.stderr, result.stdout]
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        parts.append(path.name)
        if path.suffix == ".parquet":
            parts.append(repr(pq.read_table(path).to_pylist()))
        parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def test_the_key_never_appears_in_logs_output_state_or_summary(
        tmp_path: Path, make_sim: MakeSim) -> None:
    env = {"OPENAI_API_KEY": SECRET}
    src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    out = tmp_path / "out.parquet"
    texts = []
    # 500 then ok (retried), 400 (row error, written at the next success), ok, then a quota
    # 429 (abort): json logs, raw kept.
    sim = make_sim(script=("500", "ok", "400", "ok", "quota"))
    result = _run(sim.base_url, src, out, "--concurrency", "1", "--keep-raw",
                  "--log-format", "json", env=env)
    assert result.exit_code == 3
    texts.append(_everything_written(result, tmp_path))
    # A wrong key: 401 on the first requests (console logs this time).
    locked = make_sim(require_key="the-right-key")
    result = _run(locked.base_url, src, tmp_path / "other.parquet", "--concurrency", "2",
                  env=env)
    assert result.exit_code == 3 and "401" in result.stderr
    texts.append(_everything_written(result, tmp_path))
    everything = "\n".join(texts)
    assert "HTTP 400" in everything and "quota" in everything     # the errors were written
    assert SECRET not in everything
    assert SECRET[-8:] not in everything


@pytest.mark.parametrize("status", [400, 401])
def test_the_key_is_redacted_even_when_the_server_quotes_it(
        tmp_path: Path, http_server: Callable[[Callable[[int, str], Answer]], str],
        status: int) -> None:
    def careless(_number: int, auth: str) -> Answer:
        # A careless gateway quoting the Authorization header back in its error message.
        key = auth.removeprefix("Bearer ")
        return status, {}, json.dumps({"error": {
            "message": f"Request with key {key} refused", "type": "invalid_request_error",
            "code": "invalid_api_key" if status == 401 else None}}).encode()

    base_url = http_server(careless)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    result = _run(base_url, src, out, "--concurrency", "1", env={"OPENAI_API_KEY": SECRET})
    assert result.exit_code == (1 if status == 400 else 3)
    everything = _everything_written(result, tmp_path)
    assert "refused" in everything                    # the server's message got through
    assert SECRET not in everything
