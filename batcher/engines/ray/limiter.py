"""The cluster-wide rate limit: one named actor hands out send slots to the workers.

:class:`ClusterLimiter` runs as one Ray actor per job. It keeps the same GCRA schedule as a
local run (:class:`~batcher.limits.Pacer`, at ``--rpm``/``--tpm`` × the same headroom), in
wall-clock seconds (``time.time()``: the machines of a cluster share it through NTP), and
hands the instants out; it never sleeps, so a grant is a short round trip. A cooldown any
worker starts (a 429, a remaining-quota header at zero) moves the schedule behind it and
is broadcast to every registered worker, which drops the slots it holds inside it.

How slots reach the workers depends on the rate (:func:`shared_limit`):

- **Confirmed turns** (``--rpm`` up to :data:`CONFIRMED_RPM`, :class:`ConfirmedSlots`). One
  worker at a time holds the turn: a grant of :func:`lease_size` slots (one, up to 3,000 RPM).
  The worker releases them no closer than the limit's interval to its own previous send, and
  then confirms the instants it sent them at (the last as of after its write); only then is
  the next grant handed out, and its first slot is no earlier than the last confirmed send
  + the interval (less the millisecond of :data:`~batcher.limits.TIMER_SLACK`, as in a local
  run), within the same one-second window as a local run. So no two sends of the cluster
  leave closer than one process's would, however late a worker woke: what a strict gateway
  limiter (nginx ``limit_req`` without burst) needs, where one pair too close is a 429 and a
  cooldown of the whole cluster. It costs a round trip to the limiter per grant, which the
  next worker's waiting grant hides as long as it is shorter than the interval (at 4,000
  RPM: 15 ms; a loaded machine's Ray calls take a few). What it cannot remove is the jitter
  between a send and its arrival (the server's and the client's processes scheduled late):
  a strict gateway still needs an ``--rpm`` a little below its rate, as a local run does.
- **Leases** (above :data:`CONFIRMED_RPM`, :class:`LeasedSlots`; and ``--tpm`` alone). Each
  worker leases slots at wall-clock instants, :func:`lease_size` at a time (one round trip
  per lease, not per request), waits for each slot's instant, and drops slots gone stale (a
  late slot sent late would crowd the next ones: a burst). Two sends can leave closer than
  the interval (one worker woke late, the next on time): a per-second-slice limiter never
  sees it, a strict one does, so above :data:`CONFIRMED_RPM` the cluster holds a provider's
  per-second limits but not a strict gateway's interval.

A worker that dies holding the turn never confirms: its grant expires
:data:`GRANT_EXPIRY` seconds after its last slot and the turn moves on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batcher.limits import Pacer

LEASE_SECONDS = 0.02
"""A lease (or a confirmed grant) covers about this much of the cluster's schedule (at
least one slot)."""
MAX_LEASE = 16
STALE_SLOTS = 2.0
"""A leased slot more than this many slot intervals in the past is dropped, not sent late."""
CONFIRMED_RPM = 4000.0
"""Up to this ``--rpm`` the workers take confirmed turns (see the module docstring); above,
leases. At 4,000 RPM a grant (one or two slots) covers 15-30 ms, which a round trip to the
limiter (a few ms on a loaded machine) fits in; faster, the round trips would start to cost
rate, and the leases' figures against per-second slices are met (``bench_ray.py rate``)."""
GRANT_EXPIRY = 2.0
"""Seconds after a grant's last slot at which the limiter stops waiting for its confirmation
(its worker died) and hands the turn on."""

Clock = Callable[[], float]


def lease_size(rpm: float | None) -> int:
    """Slots per lease or grant: ~20 ms of the schedule, 1 to 16 (at 6,000 RPM: 2)."""
    if not rpm:
        return 1
    return max(1, min(MAX_LEASE, math.ceil(rpm / 60.0 * LEASE_SECONDS)))


class ClusterLimiter:
    """The schedule of one job's sends across the cluster (an async Ray actor; see the module
    docstring). Units: ``rpm`` requests and ``tpm`` tokens per minute; instants are
    ``clock()`` seconds (``time.time()``; a test's virtual clock)."""

    def __init__(self, rpm: float | None, tpm: float | None, clock: Clock = time.time) -> None:
        self._clock = clock
        self._rpm = Pacer(rpm / 60.0, spacing=True) if rpm else None
        self._tpm = Pacer(tpm / 60.0) if tpm else None
        self._cooldown_until = 0.0
        self._workers: list[Any] = []
        self._turn_taken = False
        self._turns: deque[asyncio.Future[None]] = deque()
        self._grants = 0
        self._expiry: asyncio.TimerHandle | None = None
        self.leased = 0
        self.cooldowns = 0
        self.expired = 0

    def register(self, worker: Any) -> float:
        """A worker (an actor handle) to tell of cooldowns; returns the cooldown in force."""
        self._workers.append(worker)
        return self._cooldown_until

    def lease(self, count: int) -> tuple[list[float], float]:
        """``count`` consecutive send instants, and the end of the cooldown in force."""
        now = self._clock()
        self.leased += count
        if self._rpm is None:
            return [now] * count, self._cooldown_until
        return [self._rpm.reserve(1.0, now) for _ in range(count)], self._cooldown_until

    async def grant(self, count: int) -> tuple[int, list[float], float]:
        """The turn (waiting for it, in the order asked), with up to ``count`` send instants
        for it: ``(grant id, instants, the end of the cooldown in force)``. The caller sends
        at those instants (none closer than ``--rpm``'s interval to its previous send) and
        then confirms it (:meth:`confirm`), which hands the turn on."""
        if self._turn_taken:
            turn = asyncio.get_running_loop().create_future()
            self._turns.append(turn)
            await turn      # the turn is ours when this is set (see _pass_turn)
        self._turn_taken = True
        self._grants += 1
        grant, now, pacer = self._grants, self._clock(), self._rpm
        if pacer is None:       # only asked with --rpm; without, any instant is free
            instants = [now] * count
        else:
            windows = pacer.window_floors(count)
            instants = [max(pacer.reserve(1.0, now), windows[j]) for j in range(count)]
            instants[0] = max(instants[0], pacer.floor(), self._cooldown_until)
        self.leased += count
        self._expiry = asyncio.get_running_loop().call_later(
            max(0.0, instants[-1] - now) + GRANT_EXPIRY, self._expire, grant)
        return grant, instants, self._cooldown_until

    def confirm(self, grant: int, sent: list[float]) -> None:
        """Grant ``grant``'s slots were released at the instants ``sent`` (in order; fewer
        than granted when the rest went unused): the next grant counts from them."""
        if self._rpm is not None:
            for at in sent:
                self._rpm.note_release(at)
        if grant == self._grants and self._turn_taken:
            self._pass_turn()

    def _expire(self, grant: int) -> None:
        if grant == self._grants and self._turn_taken:
            self.expired += 1
            if self._rpm is not None:
                # Its worker may yet send (a stalled process): as if it sent now.
                self._rpm.note_release(self._clock())
            self._pass_turn()

    def _pass_turn(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)     # _turn_taken stays True: the turn is that waiter's
                return
        self._turn_taken = False

    def tokens(self, amount: int) -> float:
        """The instant from which ``amount`` tokens of the TPM budget are free (reserved)."""
        now = self._clock()
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
            self._tpm.refund(charged - actual, self._clock())

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
        return {"leased": self.leased, "cooldowns": self.cooldowns, "expired": self.expired,
                "workers": len(self._workers)}


def shared_limit(limiter: Any, *, rpm: float | None, tpm: float | None,
                 clock: Clock = time.time) -> ClusterSlots:
    """A worker's side of the cluster's limit: confirmed turns up to :data:`CONFIRMED_RPM`,
    leases above (see the module docstring)."""
    if rpm and rpm <= CONFIRMED_RPM:
        return ConfirmedSlots(limiter, rpm=rpm, tpm=tpm, clock=clock)
    return LeasedSlots(limiter, rpm=rpm, tpm=tpm, clock=clock)


class ClusterSlots:
    """A worker's :class:`~batcher.limits.SharedLimit`, the one its
    :class:`~batcher.limits.Throttle` paces through: the TPM budget, cooldowns and token
    settling through the cluster's :class:`ClusterLimiter` (``limiter``, an actor handle),
    and the send slots as its subclass takes them."""

    def __init__(self, limiter: Any, *, rpm: float | None, tpm: float | None,
                 clock: Clock) -> None:
        self._limiter = limiter
        self._rpm = rpm
        self._tpm = tpm
        self._clock = clock
        self._size = lease_size(rpm)
        self._cooldown_until = 0.0

    @property
    def rpm(self) -> float | None:
        return self._rpm

    async def acquire(self, tokens: int) -> None:
        at = 0.0
        if self._tpm is not None and tokens > 0:
            at = await self._limiter.tokens.remote(tokens)
        if self._rpm is not None:
            await self._slot(at)
        else:
            await self._sleep_until(at)

    async def _slot(self, not_before: float) -> None:
        """Return at this worker's next send slot (not before ``not_before``)."""
        raise NotImplementedError

    async def _sleep_until(self, at: float) -> None:
        # Until the clock says so: uvloop's timers may fire a fraction of a millisecond
        # early (they count from the loop's cached time), and a slot's floor is a promise.
        while (delay := at - self._clock()) > 0:
            await asyncio.sleep(delay)

    def cooldown(self, delay: float) -> None:
        until = self._clock() + delay
        self.heard_cooldown(until)
        self._limiter.cooldown.remote(until)

    def heard_cooldown(self, until: float) -> None:
        """A cooldown until ``until`` (wall clock): slots inside it are not used."""
        self._cooldown_until = max(self._cooldown_until, until)

    def settle_tokens(self, charged: int, actual: int, *, explicit_max: bool) -> None:
        if self._tpm is not None:
            self._limiter.settle.remote(charged, actual, explicit_max)


class LeasedSlots(ClusterSlots):
    """Slots leased in small batches at wall-clock instants (above :data:`CONFIRMED_RPM`;
    see the module docstring)."""

    def __init__(self, limiter: Any, *, rpm: float | None, tpm: float | None,
                 clock: Clock = time.time) -> None:
        super().__init__(limiter, rpm=rpm, tpm=tpm, clock=clock)
        self._stale = STALE_SLOTS * 60.0 / rpm if rpm else math.inf
        self._slots: deque[float] = deque()
        self._leasing: asyncio.Future[None] | None = None

    async def _slot(self, not_before: float) -> None:
        while True:
            now = self._clock()
            while self._slots:
                slot = self._slots.popleft()
                if slot >= self._cooldown_until and slot >= now - self._stale:
                    await self._sleep_until(max(slot, not_before))
                    return
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


@dataclass(slots=True)
class _Grant:
    """A confirmed turn held by this worker: its instants, and those already released."""

    id: int
    instants: list[float]
    sent: list[float] = field(default_factory=list)


class ConfirmedSlots(ClusterSlots):
    """Slots granted one turn at a time, each turn confirmed with its sends' instants
    (up to :data:`CONFIRMED_RPM`; see the module docstring).

    The worker's waiters take the slots of the grant it holds one after another (a lock, in
    the order they came); a grant is asked for only while some wait, for at most as many
    slots as wait, and given back at once (confirmed with what was sent) when none is left
    to use it, so an idle worker never holds the cluster's turn."""

    def __init__(self, limiter: Any, *, rpm: float, tpm: float | None,
                 clock: Clock = time.time) -> None:
        super().__init__(limiter, rpm=rpm, tpm=tpm, clock=clock)
        self._min_gap = Pacer(rpm / 60.0, spacing=True).min_gap
        self._released = -math.inf
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._grant: _Grant | None = None
        self._asking: asyncio.Future[None] | None = None

    async def _slot(self, not_before: float) -> None:
        self._waiting += 1
        try:
            async with self._turn:
                while True:
                    grant = self._grant
                    if grant is None:
                        if self._asking is None:
                            self._asking = asyncio.ensure_future(
                                self._ask(min(self._size, self._waiting)))
                        # Shielded: a waiter cancelled does not cancel the others' grant.
                        await asyncio.shield(self._asking)
                        continue
                    slot = grant.instants[len(grant.sent)]
                    await self._sleep_until(max(slot, not_before,
                                                self._released + self._min_gap))
                    if self._grant is not grant:
                        continue     # given back meanwhile (a cooldown)
                    now = self._clock()
                    if now < self._cooldown_until:
                        # A cooldown heard while waiting: its slots are void; the next
                        # grant comes after it.
                        self._give_back()
                        continue
                    self._released = now
                    grant.sent.append(now)
                    if len(grant.sent) == len(grant.instants):
                        self._give_back()
                    return
        finally:
            self._waiting -= 1
            if self._waiting == 0 and self._grant is not None:
                self._give_back()       # no one left here to use its slots

    async def _ask(self, count: int) -> None:
        try:
            grant, instants, cooldown = await self._limiter.grant.remote(count)
            self.heard_cooldown(cooldown)
            self._grant = _Grant(grant, instants)
            if self._waiting == 0:
                self._give_back()       # its waiters were cancelled meanwhile
        finally:
            self._asking = None

    def _give_back(self) -> None:
        """Confirm the grant held with what was sent of it: the turn goes on (in the loop's
        next turn, see :meth:`_confirm`)."""
        grant, self._grant = self._grant, None
        if grant is not None:
            asyncio.get_running_loop().call_soon(self._confirm, grant)

    def _confirm(self, grant: _Grant) -> None:
        # This runs after the caller's send was written (the sender awaits nothing between
        # the release and the write to a pooled connection), and its last send is confirmed
        # as of now, not of its release: a worker held up in between (descheduled, a GC
        # pause: measured up to 6 ms on a loaded machine) would otherwise have its request
        # arrive that much closer to the next worker's. Nor does the Ray call's own
        # variable cost sit between the release and the send.
        if grant.sent:
            grant.sent[-1] = max(grant.sent[-1], self._clock())
        self._limiter.confirm.remote(grant.id, grant.sent)
