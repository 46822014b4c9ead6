"""The cluster-wide rate limit: one named actor hands out send slots; workers lease them in small batches.

:class:`ClusterLimiter` runs as one Ray actor per job. It keeps the same GCRA schedule as a
local run (:class:`~batcher.limits.Pacer`, at ``--rpm``/``--tpm`` × the same headroom), in
wall-clock seconds (``time.time()``: the machines of a cluster share it through NTP), and
hands the instants out; it never sleeps, so a lease is a short round trip. A cooldown any
worker starts (a 429, a remaining-quota header at zero) moves the schedule behind it and
is broadcast to every registered worker, which drops the slots it holds inside it.

:class:`LeasedSlots` is the worker's side, the :class:`~batcher.limits.SharedLimit` its
:class:`~batcher.limits.Throttle` paces through: it leases :func:`lease_size` slots at a
time (one round trip per lease, not per request), waits for each slot's instant, and drops
slots gone stale (a late slot sent late would crowd the next ones: a burst).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any

from batcher.limits import Pacer

LEASE_SECONDS = 0.02
"""A lease covers about this much of the cluster's schedule (at least one slot)."""
MAX_LEASE = 16
STALE_SLOTS = 2.0
"""A slot more than this many slot intervals in the past is dropped, not sent late."""


def lease_size(rpm: float | None) -> int:
    """Slots per lease: ~20 ms of the schedule, 1 to 16 (at 6,000 RPM: 2)."""
    if not rpm:
        return 1
    return max(1, min(MAX_LEASE, math.ceil(rpm / 60.0 * LEASE_SECONDS)))


class ClusterLimiter:
    """The schedule of one job's sends across the cluster (a Ray actor; see the module
    docstring). Units: ``rpm`` requests and ``tpm`` tokens per minute; instants are
    ``time.time()`` seconds."""

    def __init__(self, rpm: float | None, tpm: float | None) -> None:
        self._rpm = Pacer(rpm / 60.0, spacing=True) if rpm else None
        self._tpm = Pacer(tpm / 60.0) if tpm else None
        self._cooldown_until = 0.0
        self._workers: list[Any] = []
        self.leased = 0
        self.cooldowns = 0

    def register(self, worker: Any) -> float:
        """A worker (an actor handle) to tell of cooldowns; returns the cooldown in force."""
        self._workers.append(worker)
        return self._cooldown_until

    def lease(self, count: int) -> tuple[list[float], float]:
        """``count`` consecutive send instants, and the end of the cooldown in force."""
        now = time.time()
        self.leased += count
        if self._rpm is None:
            return [now] * count, self._cooldown_until
        return [self._rpm.reserve(1.0, now) for _ in range(count)], self._cooldown_until

    def tokens(self, amount: int) -> float:
        """The instant from which ``amount`` tokens of the TPM budget are free (reserved)."""
        now = time.time()
        if self._tpm is None or amount <= 0:
            return now
        return self._tpm.reserve(float(amount), now)

    def settle(self, charged: int, actual: int, explicit_max: bool) -> None:
        """The usage a server reported for a request charged ``charged`` tokens (see
        :meth:`batcher.limits.Throttle.settle_tokens`)."""
        if self._tpm is None:
            return
        if actual > charged:
            self._tpm.charge_later(actual - charged)
        elif not explicit_max:
            self._tpm.refund(charged - actual, time.time())

    def cooldown(self, until: float) -> None:
        """A worker started a cooldown until ``until``: no slot before it, and every worker
        told (fire and forget: a worker that died misses nothing it needs)."""
        if until <= self._cooldown_until:
            return
        self._cooldown_until = until
        self.cooldowns += 1
        for pacer in (self._rpm, self._tpm):
            if pacer is not None:
                pacer.defer(until)
        for worker in self._workers:
            worker.cooldown.remote(until)

    def stats(self) -> dict[str, float]:
        return {"leased": self.leased, "cooldowns": self.cooldowns, "workers": len(self._workers)}


class LeasedSlots:
    """A worker's :class:`~batcher.limits.SharedLimit`: slots leased from the cluster's
    :class:`ClusterLimiter` (``limiter``, an actor handle), see the module docstring."""

    def __init__(self, limiter: Any, *, rpm: float | None, tpm: float | None) -> None:
        self._limiter = limiter
        self._rpm = rpm
        self._tpm = tpm
        self._size = lease_size(rpm)
        self._stale = STALE_SLOTS * 60.0 / rpm if rpm else math.inf
        self._slots: deque[float] = deque()
        self._cooldown_until = 0.0
        self._leasing: asyncio.Future[None] | None = None

    @property
    def rpm(self) -> float | None:
        return self._rpm

    async def acquire(self, tokens: int) -> None:
        at = 0.0
        if self._tpm is not None and tokens > 0:
            at = await self._limiter.tokens.remote(tokens)
        if self._rpm is not None:
            at = max(at, await self._slot())
        delay = at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _slot(self) -> float:
        while True:
            now = time.time()
            while self._slots:
                slot = self._slots.popleft()
                if slot >= self._cooldown_until and slot >= now - self._stale:
                    return slot
            if self._leasing is None:
                self._leasing = asyncio.ensure_future(self._lease())
            # Shielded: a waiter cancelled (a stop) does not cancel the others' lease.
            await asyncio.shield(self._leasing)

    async def _lease(self) -> None:
        try:
            slots, cooldown = await self._limiter.lease.remote(self._size)
            self._cooldown_until = max(self._cooldown_until, cooldown)
            self._slots.extend(slots)
        finally:
            self._leasing = None

    def cooldown(self, delay: float) -> None:
        until = time.time() + delay
        self.heard_cooldown(until)
        self._limiter.cooldown.remote(until)

    def heard_cooldown(self, until: float) -> None:
        """A cooldown until ``until`` (wall clock): slots inside it are not used."""
        self._cooldown_until = max(self._cooldown_until, until)

    def settle_tokens(self, charged: int, actual: int, *, explicit_max: bool) -> None:
        if self._tpm is not None:
            self._limiter.settle.remote(charged, actual, explicit_max)
