"""--engine ray end to end on a real local Ray (2 CPUs): the same output as live, one rate limit
for the cluster, cooldowns that reach every actor, actors and drivers killed, a second raylet.

Marked ``ray`` (skipped when Ray is not installed: ``pip install -e '.[ray]'``). Every wait is
for a condition, with a deadline; every server is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batcher.config import make_config
from batcher.engines.ray.limiter import (
    CONFIRMED_RPM,
    GRANT_EXPIRY,
    ClusterLimiter,
    ClusterSlots,
    ConfirmedSlots,
    LeasedSlots,
    shared_limit,
)
from batcher.limits import SLICE_WINDOW, TIMER_SLACK, Throttle
from batcher.runner import Runner
from batcher.simulate import SimulatorThread
from tests.conftest import prompts, read_output, run_cli, stop_process, write_jsonl
from tests.virtual_clock import VirtualClockLoop, run_virtual

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


@contextlib.contextmanager
def _simulator_process(*args: str) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """``batcher simulate ARGS`` in a process of its own: (base URL, its /_stats). Where a
    request's arrival time matters: in this process the server's thread would share one GIL
    with the driver (run in-process), whose work would hold arrivals up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "batcher", "simulate", "--port", str(port),
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _listening(port) or proc.poll() is not None, "the simulator", 30)
        assert proc.poll() is None, "the simulator exited"

        def stats() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=10) as r:
                got: dict[str, Any] = json.loads(r.read())
                return got

        yield f"http://127.0.0.1:{port}/v1", stats
    finally:
        stop_process(proc)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def test_four_actors_keep_a_strict_interval_limiter(ray_address: str, tmp_path: Path) -> None:
    """The server admits one request per 50 ms since the last one (nginx limit_req without
    burst); four actors at --rpm 900 (67 ms) never send two closer than that together, so it
    refuses (almost) none: each refusal would be a 429 and a cooldown of every actor. The
    17 ms between the two is for arrival jitter on a loaded 2-core machine (with both cores
    busy, 10 ms was not enough: 2-8 refusals in 120); how close the turns themselves keep
    the sends is tested on the virtual clock below."""
    n = 120
    src = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out.parquet"
    with _simulator_process("--strict-rpm", "1200", "--latency-ms", "20") as (url, stats):
        result = _run(src, out, url, "--engine", "ray", "--ray-actors", "4",
                      "--concurrency", "4", "--rpm", "900")
        counts = stats()
    assert result.exit_code == 0, result.stderr
    assert counts["strict_refused"] <= n // 100, counts
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


# --- the cluster limiter on a virtual clock -------------------------------------------------
# One event loop stands in for the limiter actor and every worker: a handle's calls arrive
# after a one-way delay and answer after another, as Ray's do. No Ray, no sleeping.


class _Handle:
    """An actor handle's stand-in: ``handle.method.remote(*args)`` runs ``method`` on
    ``actor`` ``delay`` seconds later and its answer arrives ``delay`` after that."""

    def __init__(self, actor: Any, delay: float) -> None:
        self._actor = actor
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._actor, name)
        delay = self._delay

        class _Method:
            @staticmethod
            def remote(*args: Any) -> asyncio.Future[Any]:
                async def call() -> Any:
                    await asyncio.sleep(delay)
                    result = method(*args)
                    if inspect.isawaitable(result):
                        result = await result
                    await asyncio.sleep(delay)
                    return result

                return asyncio.ensure_future(call())

        return _Method()


class _Broadcast:
    """What the limiter registers for a worker: its cooldown broadcast reaches ``throttle``
    and ``slots`` as :meth:`SendWorker.cooldown` would (clocks are the loop's here)."""

    def __init__(self, slots: ClusterSlots, throttle: Throttle, delay: float) -> None:
        self.cooldown = _Handle(self, delay).heard

        self._slots, self._throttle = slots, throttle

    def heard(self, until: float) -> None:
        self._slots.heard_cooldown(until)
        self._throttle.cool_until(until)


def _cluster_sends(rpm: float, n: int, *, actors: int = 4, senders: int = 16,
                   delay: float = 0.001, seed: int = 3, noise: bool = True,
                   kind: type[ClusterSlots] | None = None,
                   refuse_at: int | None = None, refused: list[float] | None = None,
                   loop_type: type[VirtualClockLoop] = VirtualClockLoop,
                   held_up: float = 0.0) -> list[tuple[float, int]]:
    """``(release time, actor)`` of ``n`` sends by ``actors`` workers sharing one
    :class:`ClusterLimiter` at ``rpm``, each with ``senders`` senders. With ``noise`` the loop
    is blocked for 2-12 ms every 10-80 ms (a loaded machine: wake-ups come late, and a worker
    late for its slot sends late). ``kind``: the worker side (default: as the engine picks).
    ``refuse_at``: the send of that number starts a 1 s cooldown (a 429) on its worker, at
    the instant it appends to ``refused``. ``loop_type``: the virtual loop to run on.
    ``held_up``: the share of sends whose worker is held up for 2-12 ms between the release
    and the write (descheduled, a GC pause); the time recorded is the write's."""
    rng = random.Random(seed)

    async def main() -> list[tuple[float, int]]:
        loop = asyncio.get_running_loop()
        limiter = ClusterLimiter(rpm, None, clock=loop.time)
        handle = _Handle(limiter, delay)
        times: list[tuple[float, int]] = []
        remaining = iter(range(n))

        async def sender(actor: int, throttle: Throttle) -> None:
            for number in remaining:
                await throttle.acquire()
                if rng.random() < held_up:
                    loop._virtual_now += rng.uniform(0.002, 0.012)  # type: ignore[attr-defined]
                times.append((loop.time(), actor))
                if number == refuse_at and refused is not None:
                    refused.append(loop.time())
                    throttle.on_rate_limited(1.0)

        async def busy() -> None:
            while len(times) < n:
                await asyncio.sleep(rng.uniform(0.01, 0.08))
                loop._virtual_now += rng.uniform(0.002, 0.012)  # type: ignore[attr-defined]

        work = []
        for actor in range(actors):
            slots = (kind(handle, rpm=rpm, tpm=None, clock=loop.time) if kind is not None
                     else shared_limit(handle, rpm=rpm, tpm=None, clock=loop.time))
            throttle = Throttle(rpm=rpm, tpm=None, concurrency=senders, shared=slots)
            limiter.register(_Broadcast(slots, throttle, delay))
            work += [sender(actor, throttle) for _ in range(senders)]
        await asyncio.gather(*work, *([busy()] if noise else []))
        await asyncio.sleep(10 * delay)     # the last confirmations and broadcasts land
        return sorted(times)

    loop = loop_type()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def _gaps(times: list[tuple[float, int]]) -> list[float]:
    return [b - a for (a, _), (b, _) in itertools.pairwise(times)]


def _rate(times: list[tuple[float, int]]) -> float:
    return (len(times) - 1) / (times[-1][0] - times[0][0]) * 60


def test_confirmed_turns_keep_a_strict_interval_across_actors_on_a_busy_loop() -> None:
    """The nginx-like case: no two sends of the cluster closer than --rpm's interval (less the
    millisecond of timer slack), however late a worker woke. Leases at wall-clock instants,
    on the same loop, put some pairs much closer (one worker late, the next on time)."""
    rpm = 2500
    floor = 60 / rpm - TIMER_SLACK - 1e-9
    times = _cluster_sends(rpm, 1500)
    assert len({actor for _, actor in times}) == 4          # every actor sent
    assert min(_gaps(times)) >= floor, min(_gaps(times))
    assert 0.9 * rpm <= _rate(times) <= rpm, _rate(times)
    leased = _cluster_sends(rpm, 1500, kind=LeasedSlots)
    assert min(_gaps(leased)) < 60 / rpm - 0.005, min(_gaps(leased))


class _EarlyTimers(VirtualClockLoop):
    """Timers fire 0.3 ms before their time, as uvloop's may (it counts a timer from the
    loop's cached clock; Ray runs async actors on uvloop)."""

    def call_at(self, when: float, callback: Callable[..., object], *args: Any,
                context: Any = None) -> asyncio.TimerHandle:
        return super().call_at(when - 0.0003, callback, *args, context=context)


def test_a_timer_that_fires_early_does_not_bring_a_send_forward() -> None:
    rpm = 2500
    times = _cluster_sends(rpm, 600, loop_type=_EarlyTimers)   # busy: some sends floor-bound
    assert min(_gaps(times)) >= 60 / rpm - TIMER_SLACK - 1e-9, min(_gaps(times))


def test_a_worker_held_up_between_release_and_write_is_confirmed_as_of_the_write() -> None:
    rpm = 2500
    times = _cluster_sends(rpm, 600, noise=False, held_up=0.1)
    assert min(_gaps(times)) >= 60 / rpm - TIMER_SLACK - 1e-9, min(_gaps(times))
    assert _rate(times) >= 0.9 * rpm, _rate(times)


def test_confirmed_turns_deliver_the_rate_when_the_loop_is_idle() -> None:
    # Whole sends a second (a fractional one loses to the window what the slices round off).
    for rpm in (600, 3000, 3600):
        times = _cluster_sends(rpm, int(rpm / 6), noise=False, delay=0.003)
        assert 0.99 * rpm <= _rate(times) <= rpm, (rpm, _rate(times))
        assert min(_gaps(times)) >= 60 / rpm - TIMER_SLACK - 1e-9, rpm


def test_confirmed_turns_never_put_more_than_the_limit_into_a_second() -> None:
    """At 4,000 RPM (grants of two slots) on a busy loop: no window of a second (plus the
    pacer's 2 ms) holds more than 66 sends, however the catching up fell."""
    rpm = CONFIRMED_RPM
    per_window = math.floor(rpm / 60)
    times = [t for t, _ in _cluster_sends(rpm, 4000, seed=5)]
    assert all(b - a >= SLICE_WINDOW - 1e-9
               for a, b in zip(times, times[per_window:], strict=False))
    assert _rate([(t, 0) for t in times]) >= 0.9 * rpm


def test_a_cooldown_on_one_actor_holds_every_actor_on_confirmed_turns() -> None:
    refused: list[float] = []
    times = _cluster_sends(1200, 200, noise=False, refuse_at=40, refused=refused)
    (refused_at,) = refused
    # Only what was on its way to the wire already: the broadcast takes a round trip.
    inside = [t for t, _ in times if refused_at + 0.005 < t < refused_at + 1.0]
    assert inside == []
    assert len(times) == 200
    after = [(t, a) for t, a in times if t >= refused_at + 1.0]
    assert min(_gaps(after)) >= 60 / 1200 - TIMER_SLACK - 1e-9   # no crowd after it


def test_the_engine_picks_confirmed_turns_up_to_confirmed_rpm_and_leases_above() -> None:
    assert isinstance(shared_limit(None, rpm=CONFIRMED_RPM, tpm=None), ConfirmedSlots)
    assert isinstance(shared_limit(None, rpm=CONFIRMED_RPM + 1, tpm=None), LeasedSlots)
    assert isinstance(shared_limit(None, rpm=None, tpm=6000), LeasedSlots)


def test_a_turn_never_confirmed_expires_and_one_given_up_passes_at_once() -> None:
    """A worker that died holding the turn holds the others up for GRANT_EXPIRY seconds
    after its slot, no longer; a worker whose waiters were cancelled (a stop) gives its
    grant back at once."""
    async def main() -> tuple[float, float, int]:
        loop = asyncio.get_running_loop()
        limiter = ClusterLimiter(600, None, clock=loop.time)
        handle = _Handle(limiter, 0.001)
        _, (dead_slot,), _ = await handle.grant.remote(1)   # and never confirmed
        alive = ConfirmedSlots(handle, rpm=600, tpm=None, clock=loop.time)
        await alive.acquire(0)
        after_expiry = loop.time()
        quitter = ConfirmedSlots(handle, rpm=600, tpm=None, clock=loop.time)
        waiting = asyncio.ensure_future(quitter.acquire(0))
        await asyncio.sleep(0.01)          # it holds the turn, its slot 0.1 s ahead
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        started = loop.time()
        await alive.acquire(0)
        await asyncio.sleep(0.01)
        return after_expiry - dead_slot, loop.time() - started, limiter.expired

    held, next_wait, expired = run_virtual(main)
    assert expired == 1
    assert GRANT_EXPIRY <= held <= GRANT_EXPIRY + 0.2, held
    assert next_wait <= 0.1 + 0.01, next_wait     # one interval, not an expiry


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
