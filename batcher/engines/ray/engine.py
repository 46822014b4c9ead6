"""The Ray engine: the live engine's sending spread over Ray actors, under one cluster-wide rate limit.

How the work is divided (and why):

- **The driver keeps the job.** The process that runs ``batcher run`` keeps everything the
  runner owns — building rows from the input (whose content Ray Data read tasks stream to
  it: :mod:`.data`), the state folder, the writer, the budget gate, the cache, result
  rows, the summary — exactly as in live mode. So resume works as today: every answer is
  made durable on the driver in the event-loop turn it arrives, and a rerun after kill -9
  re-sends only what was in flight. The state folder must sit where the driver writes
  (on shared storage, for a driver that may run on another node next time).
- **Actors only send.** ``--ray-actors N`` :class:`~.worker.SendWorker` actors (default one
  per CPU of the cluster, spread over its nodes), each with its own event loop, aiohttp
  session and :class:`~batcher.sender.Sender` at ``--concurrency``: the same providers,
  retry policy and error handling as live mode. The driver builds each request
  (``job.prepare``: provider, budget, cache), hands it to an actor, and turns the reply
  into result rows (``job.finish``). Requests queued for one actor in one event-loop turn
  go in one Ray call (up to :data:`BATCH`); the actor streams each reply back as it is
  answered, so an answer is durable as soon as in live mode. ``--concurrency × N``
  requests are in flight at most.
- **One rate limit.** ``--rpm``/``--tpm`` are the account's: one named
  :class:`~.limiter.ClusterLimiter` actor keeps the GCRA schedule and hands slots to the
  workers in small batches (confirmed turns up to 4,000 RPM, so that a strict interval
  limiter holds across actors; leases above); a 429's cooldown reaches every worker (see
  :mod:`.limiter`).
  Without ``--rpm``/``--tpm`` each worker sends unpaced, and a 429's cooldown still reaches
  all of them.
- **An actor that dies** is restarted by Ray; the requests it had are sent again (they were
  in flight: at most those are paid twice), to the restarted actor.

Why the driver, not ``map_batches``, feeds the actors: the runner's per-request gates (the
budget reservation, the cache, the held and refused-streak rows) and its durable state are
per request, on the driver; a Ray Data map would hand answers back per block, so a crash
would lose (and pay again for) whole blocks.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError

from batcher.config import RunConfig
from batcher.engine import Job, prepared_to_send
from batcher.engines.live import LiveEngine
from batcher.errors import Aborted
from batcher.log import get_logger
from batcher.results import Failed, Sent
from batcher.types import RequestRow

from .data import RayScan
from .limiter import ClusterLimiter
from .worker import Reply, SendWorker, WorkerSettings

NAMESPACE = "batcher"
MAX_ACTOR_LOSSES = 5
"""Times one request may lose its actor (the actor died with it in flight) before the job
stops (exit 3): an actor that dies over and over has a cause a retry will not cure."""
ACTOR_BACKOFF = 0.5
"""Seconds before a request whose actor died is sent again (doubling per loss)."""
BATCH = 32
"""Requests handed to one actor in one Ray call, at most (their replies stream back one
by one, each as it is answered)."""
CONTROL_CALLS = 16
"""An actor's concurrent calls beyond its sends: cooldowns, stop, ping."""


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` started here,
    ``host:port``, ``ray://…``), or, when None, start a new Ray on this machine (``local``:
    never a cluster someone else started with ``ray start``), unless this process is
    connected already (a library caller, a test). Returns True when this call connected
    (the caller then shuts Ray down)."""
    if ray.is_initialized():
        return False
    # ray.init installs its own SIGTERM handler (exit at once); the job's graceful stop
    # (in-flight answers kept, exit 143) must stay the one that runs.
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.init(address=address or "local", namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in kept.items():
                if handler is not None:
                    signal.signal(sig, handler)
    return True


class RayEngine(LiveEngine):
    """``--engine ray``; see the module docstring. Rows are grouped (embeddings) as in the
    live engine; only where a request is sent from differs."""

    name = "ray"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.scan: RayScan = RayScan(config.ray_address)
        """The input, read with Ray Data; it owns the connection to Ray (the runner closes
        it after the finalize, which reads the input's ids too)."""
        self._handles: list[Any] = []
        self._limiter: Any = None
        self._waiting: set[asyncio.Task[None]] = set()
        self._first = True
        self._outbox: list[list[tuple[tuple[Any, ...], asyncio.Future[Reply]]]] = []
        self._streams: set[asyncio.Future[None]] = set()

    async def run(self, rows: asyncio.Queue[RequestRow | None], job: Job) -> None:
        config = self.config
        self.scan.connect()
        try:
            self._start_actors()
            self._outbox = [[] for _ in self._handles]
            nodes = {node for _, node in await asyncio.gather(
                *(handle.ping.remote() for handle in self._handles))}
            get_logger().info("ray_actors_ready", actors=len(self._handles), nodes=len(nodes))
            self._workers = [asyncio.create_task(self._work_on(index, rows, job))
                             for index in range(len(self._handles))
                             for _ in range(config.concurrency)]
            if job.stop.is_set():
                self.stop(now=False)
            outcomes = await asyncio.gather(*self._workers, return_exceptions=True)
            get_logger().info("ray_sending_done", actors=len(self._handles))
        finally:
            # No reply stream may outlive Ray: a generator touched after ray.shutdown()
            # ends the process (exit 1, no message).
            for stream in self._streams:
                stream.cancel()
            await asyncio.gather(*self._streams, return_exceptions=True)
            self._stop_actors()
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome

    def stop(self, *, now: bool) -> int:
        for handle in self._handles:
            handle.stop.remote()
        for task in self._workers:
            if now or task not in self._waiting:
                task.cancel()
        return len(self._waiting)

    def actors(self) -> int:
        """The number of sending actors (known once the engine runs)."""
        return len(self._handles)

    def _start_actors(self) -> None:
        config = self.config
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        count = config.ray_actors or max(1, int(cpus))
        run = uuid.uuid4().hex[:12]
        limiter = f"limiter-{run}"
        self._limiter = ray.remote(ClusterLimiter).options(
            name=limiter, namespace=NAMESPACE, num_cpus=0,
        ).remote(config.rpm, config.tpm)
        settings = WorkerSettings(
            concurrency=config.concurrency, timeout=config.timeout,
            max_attempts=config.max_attempts, max_rate_limit_wait=config.max_rate_limit_wait,
            server_down_after=config.server_down_after, base_url=config.base_url,
            rpm=config.rpm, tpm=config.tpm, namespace=NAMESPACE)
        worker = ray.remote(SendWorker)
        self._handles = [worker.options(
            name=f"sender-{run}-{i}", namespace=NAMESPACE,
            # A share of a CPU each, so that N actors always fit the cluster.
            num_cpus=min(1.0, cpus / count), max_concurrency=config.concurrency + CONTROL_CALLS,
            max_restarts=-1, max_task_retries=0, scheduling_strategy="SPREAD",
        ).remote(settings, limiter) for i in range(count)]
        get_logger().info("ray_engine", actors=count, cluster_cpus=cpus,
                          concurrency_per_actor=config.concurrency, rpm=config.rpm,
                          tpm=config.tpm)

    def _stop_actors(self) -> None:
        for handle in (*self._handles, self._limiter):
            if handle is not None:
                ray.kill(handle, no_restart=True)

    async def _work_on(self, index: int, rows: asyncio.Queue[RequestRow | None],
                       job: Job) -> None:
        """One of actor ``index``'s places: rows from the queue, sent through that actor.
        The end marker is put back for the next place (there are more places than markers)."""
        while not job.stop.is_set():
            row = await rows.get()
            if row is None:
                rows.put_nowait(None)  # the one just taken: there is room for it
                return
            if job.stop.is_set():
                return
            group, rest, last = self._gather(row, rows)
            await self._send_on(index, group, job)
            if rest is not None and not job.stop.is_set():
                await self._send_on(index, [rest], job)
            if last:
                await rows.put(None)
                return

    async def _send_on(self, index: int, rows: list[RequestRow], job: Job) -> None:
        prepared = prepared_to_send(job, rows)
        if prepared is None:
            return
        if self._first:
            self._first = False
            job.first_send()
        task = asyncio.current_task()
        assert task is not None
        outcome: Sent | Failed | None = None
        progress = job.progress
        self._waiting.add(task)     # from here the request may be on the wire
        progress.in_flight += 1
        try:
            reply = await self._call(index, prepared.rows[0], prepared, job)
            if reply is not None:
                progress.retries += reply.retries
                progress.rate_limited += reply.rate_limited
                if reply.abort is not None:
                    job.abort(reply.abort)
                outcome = reply.outcome
        finally:
            progress.in_flight -= 1
            self._waiting.discard(task)
            # No await from the reply to here: a stop cannot lose an answer paid for.
            job.finish(prepared, outcome)

    async def _call(self, index: int, row: RequestRow, prepared: Any, job: Job) -> Reply | None:
        """The actor's reply; the request sent again (to the restarted actor) when its actor
        died with it. None when the job stopped meanwhile."""
        loop = asyncio.get_running_loop()
        for loss in range(MAX_ACTOR_LOSSES):
            if loss:
                # Ray restarts a dead actor in a second or two; calls in between may fail.
                await asyncio.sleep(ACTOR_BACKOFF * 2 ** (loss - 1))
            answer: asyncio.Future[Reply] = loop.create_future()
            self._outbox[index].append(((row, prepared.provider, prepared.request,
                                         prepared.tokens), answer))
            if len(self._outbox[index]) == 1:
                loop.call_soon(self._flush, index)
            try:
                return await answer
            except RayActorError as exc:
                get_logger().warning("ray_actor_lost", actor=index, id=row.id,
                                     note="the request is sent again, to the restarted actor",
                                     reason=type(exc).__name__)
                if job.stop.is_set():
                    return None
        job.abort(Aborted(f"Ray actor {index} died {MAX_ACTOR_LOSSES} times with request "
                          f"{row.id!r} in flight; rerun the same command to resume"))
        return None

    def _flush(self, index: int) -> None:
        """Hand the requests queued for actor ``index`` in this loop turn over in one call
        (at most :data:`BATCH` each): one Ray call per batch, not per request."""
        outbox = self._outbox[index]
        while outbox:
            batch, outbox[:BATCH] = outbox[:BATCH], []
            stream = asyncio.ensure_future(self._stream(index, batch))
            self._streams.add(stream)
            stream.add_done_callback(self._streams.discard)

    async def _stream(self, index: int,
                      batch: list[tuple[tuple[Any, ...], asyncio.Future[Reply]]]) -> None:
        try:
            replies = self._handles[index].send_many.remote([item for item, _ in batch])
            async for ref in replies:
                position, reply = await ref
                answer = batch[position][1]
                if not answer.done():
                    answer.set_result(reply)
        except Exception as exc:    # the actor died (sent again), or a defect (reported)
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
        for _, answer in batch:
            if not answer.done():
                answer.set_exception(RuntimeError("the actor's stream ended without a reply"))
