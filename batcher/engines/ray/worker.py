"""A sending actor: its own event loop, aiohttp session and :class:`~batcher.sender.Sender`.

Each :class:`SendWorker` is an async Ray actor: Ray runs its methods on one asyncio loop in
the actor's process, up to ``--concurrency`` sends at once. A send goes through the same
:class:`~batcher.sender.Sender` as in live mode — the same providers, retry policy, error
types and server-down watch — with a :class:`~batcher.limits.Throttle` that paces through
the cluster's limiter (:func:`~batcher.engines.ray.limiter.shared_limit`). What it returns
is what the sender returned, made portable across processes, plus what the driver's job
needs to hear (an abort, counters).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from batcher.errors import Aborted, JobFatal
from batcher.limits import Throttle
from batcher.log import get_logger
from batcher.pool import Transport
from batcher.providers import Provider
from batcher.results import Failed, Sent
from batcher.sender import Sender
from batcher.types import HttpRequest, HttpResponse, RequestRow

from .limiter import ClusterSlots, shared_limit


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs of the job's config (units as in :class:`~batcher.config.RunConfig`)."""

    concurrency: int
    timeout: float
    max_attempts: int
    max_rate_limit_wait: float
    server_down_after: float
    base_url: str
    rpm: float | None
    tpm: float | None
    namespace: str


@dataclass(frozen=True, slots=True)
class Reply:
    """One send's result for the driver: the outcome (None: stopped or aborted first), the
    error that ends the job if this worker met one since its last reply, and the retries
    and 429s counted since its last reply."""

    outcome: Sent | Failed | None
    abort: Aborted | JobFatal | None
    retries: int
    rate_limited: int


class _Counters:
    def __init__(self) -> None:
        self.in_flight = 0
        self.retries = 0
        self.rate_limited = 0


class SendWorker:
    """See the module docstring. ``limiter`` names the job's ClusterLimiter actor (looked up
    by name, so that an actor Ray restarts finds it again)."""

    def __init__(self, settings: WorkerSettings, limiter: str) -> None:
        self._settings = settings
        self._limiter_name = limiter
        self._limiter: Any = None
        self._counters = _Counters()
        self._reported = (0, 0)
        self._abort: Aborted | JobFatal | None = None
        self._sender: Sender | None = None
        self._transport: Transport | None = None
        self._slots: ClusterSlots | None = None
        self._started: asyncio.Future[Sender] | None = None
        self._stop: asyncio.Event | None = None

    async def send_many(self, items: list[tuple[RequestRow, Provider, HttpRequest, int]]
                        ) -> AsyncIterator[tuple[int, Reply]]:
        """Send several requests at once; yield ``(index, reply)`` for each as it is answered
        (a Ray streaming generator: one call for many requests, each reply back at once)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        sender = await self._started

        async def one(index: int, item: tuple[RequestRow, Provider, HttpRequest, int]
                      ) -> tuple[int, Sent | Failed | None]:
            return index, await sender.send(*item)

        tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
        try:
            for done in asyncio.as_completed(tasks):
                index, outcome = await done
                yield index, self._reply(_portable(outcome))
        finally:
            for task in tasks:
                task.cancel()

    async def ping(self) -> tuple[int, str]:
        """The actor is up: its process id and its Ray node's id."""
        import os

        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def stop(self) -> None:
        """The job stops: sends waiting for a slot, a cooldown or a retry give up now;
        sends on the wire finish."""
        if self._stop is not None:
            self._stop.set()

    def cooldown(self, until: float) -> None:
        """Another worker started a cooldown until ``until`` (wall clock): wait it out."""
        if self._slots is not None and self._sender is not None:
            self._slots.heard_cooldown(until)
            loop = asyncio.get_running_loop()
            self._sender.throttle.cool_until(loop.time() + (until - time.time()))

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.__aexit__(None, None, None)
            self._transport = None

    async def _start(self) -> Sender:
        import ray

        s = self._settings
        self._limiter = ray.get_actor(self._limiter_name, namespace=self._settings.namespace)
        self._stop = asyncio.Event()
        self._transport = await Transport(concurrency=s.concurrency,
                                          timeout=s.timeout).__aenter__()
        self._slots = shared_limit(self._limiter, rpm=s.rpm, tpm=s.tpm)
        throttle = Throttle(rpm=s.rpm, tpm=s.tpm, concurrency=s.concurrency,
                            shared=self._slots)
        self._sender = Sender(
            throttle=throttle, transport=self._transport, max_attempts=s.max_attempts,
            max_rate_limit_wait=s.max_rate_limit_wait, server_down_after=s.server_down_after,
            base_url=s.base_url, log=get_logger(), abort=self._on_abort, stop=self._stop,
            counters=self._counters)
        me = ray.get_runtime_context().current_actor
        until = await self._limiter.register.remote(me)
        self.cooldown(until)
        # What the process holds by now (Ray, aiohttp, pyarrow: a few hundred thousand
        # objects) stays; without this the first full collection walks all of it, ~60 ms in
        # which a request released to the wire waits in this loop while the next worker's
        # turn sends on time: the two arrive together at a strict gateway (a 429, and a
        # cooldown of the whole cluster; seen as the 4th send of an actor, every other run).
        gc.freeze()
        return self._sender

    def _on_abort(self, exc: Aborted | JobFatal) -> None:
        if self._abort is None:
            self._abort = exc

    def _reply(self, outcome: Sent | Failed | None) -> Reply:
        abort, self._abort = self._abort, None
        retries, limited = self._counters.retries, self._counters.rate_limited
        last_retries, last_limited = self._reported
        self._reported = (retries, limited)
        return Reply(outcome, abort, retries - last_retries, limited - last_limited)


def _portable(outcome: Sent | Failed | None) -> Sent | Failed | None:
    """The outcome with its response headers as a plain dict (lower-cased names, as
    :class:`HttpResponse` promises): aiohttp's header view does not cross processes."""
    if outcome is None:
        return None
    response = outcome.response
    if response is None:
        return outcome
    headers = {k.lower(): v for k, v in response.headers.items()}
    return replace(outcome, response=HttpResponse(response.status, headers, response.body,
                                                  response.ttft_ms))
