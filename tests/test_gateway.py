"""Real limiters and real outages, end to end (issue 18): 429s never burn a row, a server
that refuses is not down, a stop does not wait on cooldowns, cut streams lower concurrency,
latency excludes pacing, and a server that refuses every request stops the job."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batcher.simulator import SimulatorThread
from tests.conftest import ROOT, prompts, run_cli, write_jsonl

MakeSim = Callable[..., SimulatorThread]


def _run(base_url: str, src: Path, out: Path, *extra: str | Path) -> Any:
    return run_cli("run", src, "-o", out, "--base-url", base_url, "--model", "gpt-4o-mini",
                   "--no-progress", *extra)


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in pq.read_table(out).to_pylist()}


def _summary(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(
        out.with_name(out.name.removesuffix(".parquet") + ".summary.json").read_text())
    return summary


# --- a loopback aiohttp server with a scripted handler -------------------------------------


class _Loopback:
    """An aiohttp app on 127.0.0.1 in its own thread; ``handler`` answers every POST."""

    def __init__(self, handler: Callable[[web.Request], Any]) -> None:
        self.handler = handler
        self.requests = 0
        self.max_in_flight = 0
        self.in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback server did not start")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response: web.StreamResponse = await self.handler(request)
            return response
        finally:
            self.in_flight -= 1

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        async def cleanup() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def loopback() -> Iterator[Callable[[Callable[[web.Request], Any]], _Loopback]]:
    servers: list[_Loopback] = []

    def start(handler: Callable[[web.Request], Any]) -> _Loopback:
        server = _Loopback(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _chunk(content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "smol",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


# --- 429s are "later", not failures ------------------------------------------------------


def test_429s_do_not_count_against_max_attempts(tmp_path: Path, make_sim: MakeSim) -> None:
    sim = make_sim(script=("429:retry-after=0.05",) * 6)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--max-attempts", "2", "--concurrency", "1")
    assert result.exit_code == 0, result.stderr
    [row] = _rows(out).values()
    assert row["status"] == "ok" and row["attempts"] == 7     # six 429s, then the answer
    assert sim.stats.requests == 7


def test_a_server_answering_only_429_is_not_down_and_rows_give_up_after_the_wait(
        tmp_path: Path, make_sim: MakeSim) -> None:
    sim = make_sim(rate_429=1.0, retry_after_s=0.1)
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    job = tmp_path / "job.toml"
    # server_down_after has no flag: a job file takes it. 1 s of nothing but 429s would be
    # "down" if 429s counted; each row gives up after 2.5 s of 429s instead.
    job.write_text('input = "in.jsonl"\noutput = "out.parquet"\nserver_down_after = 1\n'
                   'max_rate_limit_wait = 2.5\nmodel = "gpt-4o-mini"\n')
    result = run_cli("run", job, "--base-url", sim.base_url, "--no-progress")
    assert result.exit_code == 1, result.stderr                # finished with failed rows
    assert "looks down" not in result.stderr
    assert "only_rate_limited" in result.stderr and "--max-rate-limit-wait" in result.stderr
    rows = _rows(tmp_path / "out.parquet")
    assert all(r["status"] == "error" and r["error_type"] == "rate_limited" for r in rows.values())
    assert all("still rate limited after 2.5 s" in r["error"] for r in rows.values())


def test_a_stop_does_not_wait_out_the_grace_for_workers_sitting_in_a_cooldown(
        tmp_path: Path, make_sim: MakeSim) -> None:
    # One worker's row gets a 429 asking for 30 s; the other's a 500, so it retries at once
    # and then waits, mid-retry, on the 30 s cooldown: nothing is on the wire.
    sim = make_sim(script=("429:retry-after=30", "500"))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "BATCHER_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(src), "-o", str(tmp_path / "out.parquet"),
         "--base-url", sim.base_url, "--model", "gpt-4o-mini", "--no-progress",
         "--concurrency", "2"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while sim.stats.by_status.get(429, 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim.stats.by_status.get(429, 0) == 1
        time.sleep(1.0)                        # every worker now waits on the 30 s cooldown
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=25)           # the grace is 30 s: this would time out
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 143
    assert took < 5, took


# --- streams cut when another request arrives (llama-cpp-python's default) ----------------


def test_streams_cut_while_others_start_lower_concurrency_until_they_finish(
        tmp_path: Path, loopback: Callable[[Callable[[web.Request], Any]], _Loopback]) -> None:
    running: list[asyncio.Event] = []

    async def interrupting(request: web.Request) -> web.StreamResponse:
        for other in running:                 # a new request interrupts every running one
            other.set()
        cut = asyncio.Event()
        running.append(cut)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for word in ("one ", "two ", "three"):
                await asyncio.sleep(0.02)
                if cut.is_set():
                    await response.write(b"data: [DONE]\n\n")     # no finish_reason
                    return response
                await response.write(_chunk(word))
            await response.write(_chunk(None, "stop") + b"data: [DONE]\n\n")
            return response
        finally:
            running.remove(cut)

    server = loopback(interrupting)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    out = tmp_path / "out.parquet"
    result = _run(server.base_url, src, out, "-p", "stream=true", "--concurrency", "8")
    assert result.exit_code == 0, result.stderr
    rows = _rows(out)
    assert len(rows) == 20 and all(r["status"] == "ok" for r in rows.values())
    assert all(r["output"] == "one two three" for r in rows.values())
    assert re.search(r"\] streams_cut .*concurrency=\d", result.stderr), result.stderr
    # Lowered to one in flight after a few cuts (retrying at 8 in flight takes ~50).
    assert server.requests <= 35, server.requests


# --- latency is the server's, not the pacer's ----------------------------------------------


def test_latency_ms_excludes_pacing_and_wait_ms_holds_it(
        tmp_path: Path, make_sim: MakeSim) -> None:
    sim = make_sim()
    src = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--rpm", "240")       # one send per ~0.25 s
    assert result.exit_code == 0, result.stderr
    rows = list(_rows(out).values())
    assert all(r["latency_ms"] < 200 for r in rows), [r["latency_ms"] for r in rows]
    assert max(r["wait_ms"] for r in rows) >= 1000               # the sixth waited 5 slots


# --- a server that refuses everything ------------------------------------------------------


def test_identical_client_errors_on_consecutive_rows_stop_the_job_and_keep_rows_pending(
        tmp_path: Path, loopback: Callable[[Callable[[web.Request], Any]], _Loopback],
        make_sim: MakeSim) -> None:
    async def broken(_request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "No connected db.",
                                            "type": "invalid_request_error"}}, status=400)

    server = loopback(broken)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(300))
    out = tmp_path / "out.parquet"
    result = _run(server.base_url, src, out, "--concurrency", "4")
    assert result.exit_code == 3, result.stderr
    assert "No connected db." in result.stderr and "refused" in result.stderr
    assert server.requests < 40, server.requests
    summary = _summary(out)
    assert summary["outcome"] == "aborted" and summary["error"] == 0   # nothing written off
    healthy = make_sim()
    result = _run(healthy.base_url, src, out)
    assert result.exit_code == 0, result.stderr
    assert healthy.stats.requests == 300


def test_a_client_error_of_one_row_is_still_written_when_others_succeed(
        tmp_path: Path, loopback: Callable[[Callable[[web.Request], Any]], _Loopback]) -> None:
    async def picky(request: web.Request) -> web.Response:
        body = await request.json()
        if "item number 3" in body["messages"][-1]["content"]:
            return web.json_response({"error": {"message": "bad row"}}, status=400)
        return web.json_response({
            "id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    server = loopback(picky)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    out = tmp_path / "out.parquet"
    result = _run(server.base_url, src, out, "--concurrency", "1")
    assert result.exit_code == 1, result.stderr
    rows = _rows(out)
    assert rows["r3"]["status"] == "error" and rows["r3"]["http_status"] == 400
    assert sum(r["status"] == "ok" for r in rows.values()) == 9


# --- the simulator's strict limiter (nginx limit_req without burst) ------------------------


def test_rpm_below_a_strict_limiter_gets_no_429(tmp_path: Path, make_sim: MakeSim) -> None:
    sim = make_sim(strict_rpm=600)                      # one request per 100 ms, no burst
    src = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--rpm", "450", "--concurrency", "16")
    assert result.exit_code == 0, result.stderr
    assert sim.stats.strict_admitted == 30
    # Sends leave >= 133 ms apart; only a machine stalled for over 33 ms between one send
    # and the next could make one arrive early (exact spacing is proven on a virtual clock).
    assert sim.stats.strict_refused <= 1, sim.stats.strict_refused


def test_without_rpm_a_strict_limiter_with_retry_after_storms_is_found_and_every_row_ok(
        tmp_path: Path, make_sim: MakeSim) -> None:
    sim = make_sim(strict_rpm=600, strict_retry_after=0.5)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(60))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--concurrency", "32", "--max-attempts", "2")
    assert result.exit_code == 0, result.stderr          # 429s burnt no row
    rows = _rows(out)
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows.values())
    # The first burst is refused, then the rate is found: far fewer 429s than answers.
    assert sim.stats.strict_refused < 32 + 60, sim.stats.strict_refused
