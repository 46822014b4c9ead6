"""--engine ray end to end on a real local Ray (2 CPUs): the same output as live, one rate limit
for the cluster, cooldowns that reach every actor, actors and drivers killed, a second raylet.

Marked ``ray`` (skipped when Ray is not installed: ``pip install -e '.[ray]'``). Every wait is
for a condition, with a deadline; every server is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batcher.config import make_config
from batcher.runner import Runner
from batcher.simulate import SimulatorThread
from tests.conftest import prompts, read_output, run_cli, write_jsonl

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

KEY = "sk-test-ray-0123456789"
COMPARED = ("id", "status", "output", "finish_reason", "model", "prompt_tokens",
            "completion_tokens", "total_tokens", "cost_usd", "error", "http_status", "prompt")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray with 2 CPUs for this module; the in-process runs use it as it is, the
    subprocess drivers join it by address."""
    ray.init(address="local", num_cpus=2, namespace="batcher", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _run(src: Path, out: Path, base_url: str, *extra: str) -> Any:
    return run_cli("run", src, "-o", out, "--base-url", base_url, "--model", "gpt-4o-mini",
                   "--no-progress", *extra)


def _summary(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(
        out.with_name(out.name.removesuffix(".parquet") + ".summary.json").read_text())
    return summary


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _exactly_once(out: Path, ids: list[str]) -> list[dict[str, Any]]:
    rows = read_output(out)
    got = [str(r["id"]) for r in rows]
    assert len(got) == len(set(got)), "duplicate ids in the output"
    assert sorted(got) == sorted(ids)
    return rows


# --- the same job as live -----------------------------------------------------------------


def test_output_and_summary_equal_the_live_engines(ray_address: str, sim: SimulatorThread,
                                                   tmp_path: Path) -> None:
    rows = [*prompts(40), {"id": "no-prompt"}, *prompts(5, start=40)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    live, on_ray = tmp_path / "live.parquet", tmp_path / "ray.parquet"
    first = _run(src, live, sim.base_url, "--concurrency", "4")
    second = _run(src, on_ray, sim.base_url, "--concurrency", "4", "--engine", "ray",
                  "--ray-actors", "2")
    assert first.exit_code == second.exit_code == 1, second.stderr   # the bad row: exit 1
    assert "no-prompt" in second.stderr or "bad_row" in second.stderr
    a, b = pq.read_table(live), pq.read_table(on_ray)
    assert a.schema == b.schema
    def by_id(table: Any) -> list[dict[str, Any]]:
        return sorted(table.select(COMPARED).to_pylist(), key=lambda r: str(r["id"]))

    assert by_id(a) == by_id(b)
    sa, sb = _summary(live), _summary(on_ray)
    assert sa.keys() == sb.keys()
    for key in ("outcome", "exit_code", "rows", "ok", "error", "skipped", "sent_this_run",
                "prompt_tokens", "completion_tokens", "cost_usd", "errors_by_type"):
        assert sa[key] == sb[key], key
    status = run_cli("status", on_ray, "--json")
    assert status.exit_code == 0
    assert json.loads(status.stdout)["done"] == 45


def test_job_file_engine_ray(ray_address: str, sim: SimulatorThread, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(6))
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out.parquet"\nmodel = "gpt-4o-mini"\n'
                   f'base_url = "{sim.base_url}"\nengine = "ray"\nray_actors = 1\n'
                   f'no_report = true\n')
    result = run_cli("run", job, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert "ray_engine" in result.stderr
    _exactly_once(tmp_path / "out.parquet", [f"r{i}" for i in range(6)])


# --- one rate limit for the cluster --------------------------------------------------------


def test_four_actors_keep_one_limit(ray_address: str, make_sim: Callable[..., SimulatorThread],
                                    tmp_path: Path) -> None:
    """The server allows 1,200 RPM in one-second slices; four actors at --rpm 1200 stay
    under it together (four separate pacers would send 4,800 RPM and be refused)."""
    limit, n = 1200, 100
    sim = make_sim(rpm=limit, latency_ms=20)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out.parquet"
    result = _run(src, out, sim.base_url, "--engine", "ray", "--ray-actors", "4",
                  "--concurrency", "4", "--rpm", str(limit))
    assert result.exit_code == 0, result.stderr
    stats = sim.stats
    assert stats.rate_limited <= n // 100, stats.as_dict()
    assert stats.requests <= n + n // 100
    # Paced: n sends at 98.5% of 20/s take at least (n - 1) / 20 s (the run includes start-up).
    assert _summary(out)["duration_s"] >= (n - 1) / (limit / 60.0)
    _exactly_once(out, [f"r{i}" for i in range(n)])


def test_four_actors_keep_one_token_limit(ray_address: str,
                                          make_sim: Callable[..., SimulatorThread],
                                          tmp_path: Path) -> None:
    """--tpm is the account's too: four actors charge one token schedule (four separate ones
    would send four times the server's 6,000 tokens a minute and be refused)."""
    n = 24
    sim = make_sim(tpm=6000, latency_ms=20)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out.parquet"
    result = _run(src, out, sim.base_url, "--engine", "ray", "--ray-actors", "4",
                  "--concurrency", "4", "--tpm", "6000", "-p", "max_tokens=20")
    assert result.exit_code == 0, result.stderr
    assert sim.stats.rate_limited == 0, sim.stats.as_dict()
    assert sim.stats.requests == n
    _exactly_once(out, [f"r{i}" for i in range(n)])


class _Recorder:
    """A chat server that answers the first request 429 (Retry-After: 1 s) and every other
    one after 50 ms, and records when each request arrived (monotonic seconds)."""

    ANSWER: ClassVar[dict[str, Any]] = {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) == 1:
            return web.json_response({"error": {"message": "Rate limit reached",
                                                "type": "requests", "code": "rate_limit_exceeded"}},
                                     status=429, headers={"Retry-After": "1"})
        await asyncio.sleep(0.05)
        return web.json_response(self.ANSWER)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> _Recorder:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def test_a_429_cools_down_every_actor(ray_address: str, tmp_path: Path) -> None:
    """One 429 (Retry-After 1 s) on one actor: no actor sends during the cooldown. Without the
    broadcast the three other actors would go on sending every 50 ms."""
    src = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    out = tmp_path / "out.parquet"
    with _Recorder() as server:
        result = _run(src, out, f"http://127.0.0.1:{server.port}/v1", "--engine", "ray",
                      "--ray-actors", "4", "--concurrency", "2")
    assert result.exit_code == 0, result.stderr
    first = server.arrivals[0]
    inside = [t - first for t in server.arrivals if 0.2 < t - first < 0.9]
    assert inside == [], f"{len(inside)} requests sent inside the cooldown"
    assert len(server.arrivals) == 41
    _exactly_once(out, [f"r{i}" for i in range(40)])


# --- actors and drivers killed ----------------------------------------------------------------


async def test_an_actor_killed_mid_run_is_replaced(ray_address: str,
                                                   make_sim: Callable[..., SimulatorThread],
                                                   tmp_path: Path) -> None:
    n, concurrency = 160, 4
    sim = make_sim(latency_ms=100)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out.parquet"
    config = make_config({"input": src, "output": out, "base_url": sim.base_url,
                          "model": "gpt-4o-mini", "engine": "ray", "ray_actors": 2,
                          "concurrency": concurrency})
    job = asyncio.create_task(Runner(config).run())
    deadline = time.monotonic() + 60
    while sim.stats.ok < 20:
        assert not job.done(), job.result()
        assert time.monotonic() < deadline, "no progress"
        await asyncio.sleep(0.02)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("sender-")]
    victim = ray.get_actor(sorted(names)[0], namespace="batcher")
    pid, _node = await victim.ping.remote()
    os.kill(pid, signal.SIGKILL)
    summary = await asyncio.wait_for(job, 120)
    assert summary.outcome == "finished" and summary.ok == n, summary
    _exactly_once(out, [f"r{i}" for i in range(n)])
    # Re-sent: at most the requests the dead actor had in flight.
    assert sim.stats.requests <= n + concurrency
    assert sim.stats.resent_after_ok <= concurrency


def test_driver_killed_resumes_with_nothing_sent_twice(
        ray_address: str, make_sim: Callable[..., SimulatorThread], tmp_path: Path) -> None:
    n, actors, concurrency = 400, 2, 4
    sim = make_sim(latency_ms=40)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out), "--base-url",
           sim.base_url, "--model", "gpt-4o-mini", "--no-progress", "--engine", "ray",
           "--ray-address", ray_address, "--ray-actors", str(actors),
           "--concurrency", str(concurrency)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: sim.stats.ok >= 60 or proc.poll() is not None, "60 answers")
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    status = run_cli("status", out, "--json")
    assert status.exit_code == 0, status.stderr
    done = json.loads(status.stdout)["done"]
    assert 0 < done < n
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    _exactly_once(out, [f"r{i}" for i in range(n)])
    summary = _summary(out)
    assert summary["resumed"] == done and summary["sent_this_run"] == n - done
    # Paid twice: at most what was handed to the actors at the kill.
    assert sim.stats.resent_after_ok <= actors * concurrency
    assert sim.stats.requests <= n + actors * concurrency


def test_sigterm_stops_gracefully_on_a_local_ray(
        ray_address: str, make_sim: Callable[..., SimulatorThread], tmp_path: Path) -> None:
    """No --ray-address: the driver starts its own Ray. SIGTERM keeps batcher's graceful stop
    (ray.init installs a handler of its own): exit 143, answers in flight kept, and the
    rerun sends nothing twice."""
    n = 300
    sim = make_sim(latency_ms=40)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out), "--base-url",
           sim.base_url, "--model", "gpt-4o-mini", "--no-progress", "--engine", "ray",
           "--ray-actors", "2", "--concurrency", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: sim.stats.ok >= 30 or proc.poll() is not None, "30 answers", 120)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stderr[-3000:]
    again = subprocess.run([*cmd, "--ray-address", ray_address], capture_output=True,
                           text=True, timeout=180, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    _exactly_once(out, [f"r{i}" for i in range(n)])
    assert sim.stats.resent_after_ok == 0
    assert sim.stats.requests == n


# --- a second node ---------------------------------------------------------------------------


def _ray_start(*args: str, temp_dir: str) -> int:
    """``ray start ARGS`` in a session of its own; returns its process group, which the
    processes it starts (GCS, raylet, workers) stay in."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen([ray_bin, "start", *args, "--disable-usage-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=_cluster_env(temp_dir))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    return proc.pid


def _cluster_env(temp_dir: str) -> dict[str, str]:
    # Loopback only: no token (the cluster's nodes and driver would otherwise need one).
    return {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "disabled"}


def _stop_group(group: int) -> None:
    """Stop one ``ray start``'s processes, by their process group (``ray stop`` would stop
    every Ray on the machine)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def test_two_raylets_stand_in_for_two_nodes(make_sim: Callable[..., SimulatorThread],
                                            tmp_path: Path) -> None:
    """A head and a second raylet (its own CPU and a resource of its own): two actors spread
    over both nodes and the job finishes as on one."""
    sim = make_sim(latency_ms=10)
    temp_dir = tempfile.mkdtemp(prefix="bray", dir="/tmp")
    port = _free_port()
    groups: list[int] = []
    try:
        groups.append(_ray_start("--head", "--port", str(port), "--num-cpus", "1",
                                 "--temp-dir", temp_dir, "--include-dashboard", "false",
                                 temp_dir=temp_dir))
        groups.append(_ray_start("--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                                 "--resources", '{"second_node": 1}', temp_dir=temp_dir))
        src = write_jsonl(tmp_path / "in.jsonl", prompts(30))
        out = tmp_path / "out.parquet"
        done = subprocess.run(
            [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out), "--base-url",
             sim.base_url, "--model", "gpt-4o-mini", "--no-progress", "--log-format", "json",
             "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--ray-actors", "2",
             "--concurrency", "4"],
            capture_output=True, text=True, timeout=180, check=False,
            env=_cluster_env(temp_dir))
        assert done.returncode == 0, done.stderr[-3000:]
        ready = [json.loads(line) for line in done.stderr.splitlines()
                 if line.startswith("{") and '"ray_actors_ready"' in line]
        assert ready and ready[0]["nodes"] == 2, done.stderr[-3000:]
        _exactly_once(out, [f"r{i}" for i in range(30)])
    finally:
        for group in reversed(groups):
            _stop_group(group)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
