"""Pacing: RPM/TPM spaced evenly below the limit, global cooldowns, adaptive concurrency."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Protocol

from batcher.providers.base import parse_duration

HEADROOM = 0.995
"""Fraction of a stated limit that is used. Sends are spaced evenly at 99.5% of the limit; what
keeps a provider that counts in per-second slices from ever seeing more than its limit in one
slice is the request pacer's window (:data:`SLICE_WINDOW`), so the headroom only has to cover
the jitter between our clock and the server's."""

SLICE_WINDOW = 1.002
"""The request pacer never lets more than floor(limit per second) sends into any window of this
many seconds, counted on the times sends were released: late wake-ups that catch up cannot
bunch into one of the provider's one-second slices. The 2 ms over a second cover the jitter of
arrival at the server (loopback and LAN take well under a millisecond)."""

TIMER_SLACK = 0.001
"""Seconds by which the spacing floor sits below the limit's interval (at most a tenth of it):
the event loop's timers wake up to a millisecond late (epoll rounds its timeout up to whole
milliseconds), so a floor of exactly the interval would make every floor-bound send late and
lose ~5% of a 6,000 RPM limit; a millisecond of catching up keeps delivery at the schedule."""

MAX_COOLDOWN = 60.0
DEFAULT_COOLDOWN = 1.0
PACED_COOLDOWN_SLOTS = 4
"""A 429 with no advice while requests are paced at a stated ``--rpm``: the cooldown starts at
this many of the limit's intervals (at most :data:`DEFAULT_COOLDOWN`) and doubles with each
429 that follows without a success between. Sends paced at the limit that still meet such a
429 have mostly met a strict gateway's interval through arrival jitter (nginx ``limit_req``
sends no Retry-After): one refusal, not an overload, and a whole second each was most of the
rate such a run lost. A real overload still backs off: the doubling reaches a second within
a few refusals."""


class Pacer:
    """Spaces units (requests, or tokens) evenly at ``per_second`` × :data:`HEADROOM`.

    Each acquire reserves the next free instant and sleeps until it (the "theoretical arrival
    time" of GCRA). Why not a leaky bucket (aiolimiter): with a bucket small enough to never
    burst over a one-second slice (one request), every late wake-up of a waiter loses the time
    by which it was late, and delivery falls to ~88% of the limit; here a late wake-up loses
    little, because the next slot follows the previous slot, not "now". Idle time is not
    banked either: after a pause the next send is simply "now", never a burst.

    With ``spacing`` (the request pacer), no two releases are ever closer than the limit's own
    interval (``1 / per_second``) less :data:`TIMER_SLACK`, however late a waiter woke: a
    strict gateway limiter (nginx ``limit_req`` without burst) refuses a request that follows
    the last one by less. And no window of :data:`SLICE_WINDOW` seconds holds more than
    floor(``per_second``) releases (at two or more a second): a limiter counting per-second
    slices never sees more than its limit in one, however the wake-ups fell. On time, the
    schedule's own spacing keeps both checks idle. :meth:`push_back` moves the whole schedule
    behind a cooldown: waiters whose slots fell inside it take fresh, evenly spaced slots
    after it instead of leaving together.
    """

    __slots__ = ("_epoch", "_firsts", "_next", "_recent", "_released", "_resume_at", "interval",
                 "min_gap", "per_second", "spacing")

    def __init__(self, per_second: float, *, spacing: bool = False) -> None:
        self.spacing = spacing
        self._next = 0.0
        self._released = -math.inf
        self._epoch = 0
        self._resume_at = -math.inf
        """No release before this (the end of the last :meth:`push_back`)."""
        self._firsts = 0
        """Waiters that go first (retries) not yet released: the others make way for them."""
        self._recent: deque[float] | None = None
        """The last floor(per_second) release times (the request pacer at >= 2/s)."""
        self.set_rate(per_second)

    def set_rate(self, per_second: float) -> None:
        """Pace at a new rate from the next reservation on (slots already taken stand)."""
        self.per_second = per_second
        self.interval = 1.0 / (per_second * HEADROOM)
        gap = 1.0 / per_second
        self.min_gap = gap - min(TIMER_SLACK, 0.1 * gap) if self.spacing else 0.0
        per_window = math.floor(per_second) if self.spacing and per_second >= 2 else 0
        if per_window == 0:
            self._recent = None
        elif self._recent is None or self._recent.maxlen != per_window:
            self._recent = deque(self._recent or (), maxlen=per_window)

    def reserve(self, amount: float, now: float) -> float:
        """Take the next free instant for ``amount`` units (never before ``now``) and return
        it, without waiting: the schedule itself, for a caller that waits elsewhere (the Ray
        engine's cluster limiter hands these instants out to its workers)."""
        start = max(self._next, now)
        self._next = start + amount * self.interval
        return start

    def defer(self, until: float) -> None:
        """No instant before ``until`` is handed out; instants already handed out stand."""
        if until > self._next:
            self.push_back(until)

    async def acquire(self, amount: float = 1.0, *, first: bool = False) -> None:
        """Wait for ``amount`` units. ``first`` (a retry, on the request pacer): take the next
        instant the spacing allows, ahead of the waiters that reserved theirs, and move the
        schedule back by one slot, so that the rate stays the same."""
        loop = asyncio.get_running_loop()
        first = first and self.spacing
        epoch = -1
        start = 0.0
        if first:
            self._firsts += 1
        try:
            while True:
                now = loop.time()
                if epoch != self._epoch:       # first pass, or the schedule was pushed back
                    epoch = self._epoch
                    if first:
                        start = max(now, self._resume_at)
                        self._next = max(self._next, start) + amount * self.interval
                    else:
                        start = self.reserve(amount, now)
                wait = max(start, self.floor()) - now
                if wait <= 0 and self._firsts and not first:
                    wait = self.min_gap or self.interval    # make way for a retry
                if wait <= 0:
                    self.note_release(now)
                    return
                await asyncio.sleep(wait)
        finally:
            if first:
                self._firsts -= 1

    def floor(self) -> float:
        """The earliest instant the spacing and the window allow the next release:
        ``min_gap`` after the last release (0 without ``spacing``), and :data:`SLICE_WINDOW`
        after the release floor(``per_second``) releases back (the request pacer)."""
        at = self._released + self.min_gap
        recent = self._recent
        if recent is not None and len(recent) == recent.maxlen:
            at = max(at, recent[0] + SLICE_WINDOW)
        return at

    def window_floors(self, count: int) -> list[float]:
        """The floors the window alone puts under the next ``count`` releases (the ``j``-th
        may not leave before :data:`SLICE_WINDOW` after the release floor(``per_second``)
        releases before it): for a caller that hands several releases out at once."""
        recent = self._recent
        if recent is None or recent.maxlen is None:
            return [-math.inf] * count
        missing = recent.maxlen - len(recent)
        return [recent[j - missing] + SLICE_WINDOW if 0 <= j - missing < len(recent)
                else -math.inf for j in range(count)]

    def note_release(self, at: float) -> None:
        """A release at ``at``: what :meth:`floor` counts from. :meth:`acquire` calls it;
        a caller that paces elsewhere (the Ray engine's cluster limiter, told of its
        workers' sends) calls it with each send's instant, in order."""
        self._released = max(self._released, at)
        if self._recent is not None:
            self._recent.append(at)

    def push_back(self, until: float) -> None:
        """Start the schedule again at ``until``: every waiter re-reserves behind it."""
        self._epoch += 1
        self._next = self._resume_at = until

    def charge_later(self, amount: float) -> None:
        """Push the next free slot back by ``amount`` (units used beyond what was charged)."""
        self._next += amount * self.interval

    def refund(self, amount: float, now: float | None = None) -> None:
        """Give back ``amount`` units charged but not used (never earlier than ``now``,
        default the event loop's clock)."""
        if now is None:
            now = asyncio.get_running_loop().time()
        self._next = max(now, self._next - amount * self.interval)


class SharedLimit(Protocol):
    """Pacing that several processes share (the Ray engine's cluster-wide limit): a
    :class:`Throttle` given one paces through it instead of its own pacers, and tells it of
    every cooldown it starts so that the cooldown reaches the other processes too."""

    @property
    def rpm(self) -> float | None:
        """The shared requests-per-minute limit, or None."""
        ...

    async def acquire(self, tokens: int) -> None:
        """Wait for one request's send slot and ``tokens`` of the TPM budget."""
        ...

    def cooldown(self, delay: float) -> None:
        """This process starts a cooldown of ``delay`` seconds from now: tell the others."""
        ...

    def settle_tokens(self, charged: int, actual: int, *, explicit_max: bool) -> None:
        """Correct the shared TPM account (see :meth:`Throttle.settle_tokens`)."""
        ...


DISCOVER_DECREASE = 0.7
"""Without --rpm/--tpm: the send rate is multiplied by this on a 429 that follows a success
(once per cooldown). 429s with no success between leave it: the server is refusing for a
while (the doubling cooldown spaces those), and a rate cut to a crawl would take long to
climb back, with every waiter's slot already reserved at the crawl."""
DISCOVER_PROBE = 0.02
"""Each success raises a discovered rate by 2% divided by the successes it expects in a
second (at least one): about 2% a second at fast rates, 2% a success at slow ones..."""
DISCOVER_PROBE_FAST = 0.2
"""...and by 20% a second until the first cut: the first guess (a fraction of what was sent in
the second before a 429) may be far below the limit."""
DISCOVER_MIN_PER_SECOND = 1.0 / 60.0
STREAM_PROBE = 50
"""Successes without a cut stream after which the concurrency lowered by cuts grows by one."""


class Throttle:
    """The gate every request passes before it is sent, shared by all workers.

    - ``rpm``/``tpm``: :class:`Pacer` values. TPM is charged with the request's prompt tokens
      plus its ``max_tokens`` before sending — as OpenAI counts a request on arrival — and
      corrected by :meth:`settle_tokens` with the usage the server reports (see there).
    - A 429 anywhere sets a *global* cooldown (the server's advice, else a doubling default)
      that every worker waits out before its next send, instead of each worker hammering;
      the pacers' schedules restart behind it, so it ends in evenly spaced sends, not a crowd.
    - ``x-ratelimit-remaining-*`` at zero cools down until one unit refills.
    - With no rpm/tpm given, the send rate is discovered AIMD-style: unpaced until a second
      429 (the first may answer a start-up burst), then paced at the rate seen in the last
      second × :data:`DISCOVER_DECREASE`, cut again on each 429 that follows a success and
      probed upward on successes; concurrency adapts too (halved on a 429, grown by one per
      window of successes, up to ``concurrency``).
    - Streams cut while others run (a server that interrupts a stream when a new request
      arrives) halve the concurrency, down to one (:meth:`on_stream_cut`).
    - With ``shared`` (a :class:`SharedLimit`: the Ray engine's cluster-wide limit), requests
      are paced by it instead of local pacers, the rate is not discovered, every cooldown
      started here is told to it, and :meth:`cool_until` takes the cooldowns it reports.
    """

    def __init__(self, *, rpm: float | None, tpm: float | None, concurrency: int,
                 shared: SharedLimit | None = None) -> None:
        self._shared = shared
        if shared is not None:
            rpm = tpm = None     # paced by the shared limit, not here
        self._rpm = Pacer(rpm / 60.0, spacing=True) if rpm else None
        self._tpm = Pacer(tpm / 60.0) if tpm else None
        self._cooldown_until = 0.0
        self._consecutive_429 = 0
        self._ok_since_429 = True
        self._burst_forgiven = False
        self._probe_fast = True
        self.adaptive = rpm is None and tpm is None and shared is None
        self.max_concurrency = concurrency
        self.window = float(concurrency)
        self.stream_cap = concurrency
        self._ok_since_cut = 0
        self._in_flight = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._recent_sends: deque[float] = deque()
        self.cooldowns = 0

    @property
    def rpm(self) -> float | None:
        """The requests per minute the pacer keeps to (stated, or discovered), or None."""
        if self._shared is not None:
            return self._shared.rpm
        return self._rpm.per_second * 60.0 if self._rpm is not None else None

    # --- dispatch -----------------------------------------------------------------------

    async def wait_cooldown(self) -> None:
        """Return once no global cooldown is in force (re-checked: another 429 may extend it)."""
        loop = asyncio.get_running_loop()
        while (delay := self._cooldown_until - loop.time()) > 0:
            await asyncio.sleep(delay)

    @property
    def paced(self) -> bool:
        """Whether requests are paced (a stated, discovered or cluster-wide RPM)."""
        return self._rpm is not None or (self._shared is not None
                                          and self._shared.rpm is not None)

    async def acquire(self, tokens: int = 0, *, first: bool = False) -> None:
        """Wait for the cooldown, ``tokens`` of the TPM budget and one request of the RPM
        budget, in that order: the request pacer is the last gate, so its spacing is the
        spacing of the sends (a caller sends without awaiting anything else first).
        ``first``: a retry, which takes the request pacer's next free slot ahead of new rows
        (see :meth:`Pacer.acquire`)."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wait_cooldown()
            if self._shared is not None:
                await self._shared.acquire(tokens)
            if self._tpm is not None and tokens > 0:
                await self._tpm.acquire(tokens)
            if self._rpm is not None:
                await self._rpm.acquire(1, first=first)
            if loop.time() >= self._cooldown_until:
                break
        if self.adaptive:
            now = loop.time()
            sends = self._recent_sends
            sends.append(now)
            while sends[0] < now - 1.0:
                sends.popleft()

    def settle_tokens(self, charged: int, actual: int | None, *, explicit_max: bool) -> None:
        """Correct the TPM account with the usage the server reported.

        Tokens used beyond the charge are charged now (they delay later requests). Unused
        tokens are given back only when the charge rested on our own default for a missing
        ``max_tokens``: when the request carried ``max_tokens``, the provider counted all of
        it on arrival and gives nothing back, so neither do we."""
        if self._shared is not None and actual is not None:
            self._shared.settle_tokens(charged, actual, explicit_max=explicit_max)
        if self._tpm is None or actual is None:
            return
        if actual > charged:
            self._tpm.charge_later(actual - charged)
        elif not explicit_max:
            self._tpm.refund(charged - actual)

    # --- concurrency: adaptive (no limits given) and lowered by cut streams ----------------

    def slot(self) -> _Slot:
        """``async with throttle.slot():`` holds one of the concurrency window's places."""
        return _Slot(self)

    def _limit(self) -> int:
        window = int(self.window) if self.adaptive else self.max_concurrency
        return max(1, min(window, self.stream_cap))

    async def _enter_slot(self) -> None:
        # Fast path without any lock: a free place is simply taken (one event loop, no
        # await between the check and the increment).
        while self._in_flight >= self._limit():
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Pass a wake-up we may have consumed on to the next waiter.
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise
        self._in_flight += 1

    async def _exit_slot(self) -> None:
        self._in_flight -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # --- feedback from answers ------------------------------------------------------------

    def on_success(self, headers: Mapping[str, str]) -> None:
        self._consecutive_429 = 0
        self._ok_since_429 = True
        if self.adaptive:
            if self.window < self.max_concurrency:
                self.window = min(float(self.max_concurrency), self.window + 1.0 / self.window)
            pacer = self._rpm
            # Probe upward only while the pacer is what holds the sends back.
            if pacer is not None and len(self._recent_sends) >= 0.9 * pacer.per_second:
                rate = pacer.per_second
                step = DISCOVER_PROBE_FAST if self._probe_fast else DISCOVER_PROBE
                pacer.set_rate(rate * (1.0 + step / max(1.0, rate)))
        if self.stream_cap < self.max_concurrency:
            self._ok_since_cut += 1
            if self._ok_since_cut >= STREAM_PROBE:
                self._ok_since_cut = 0
                self.stream_cap += 1
        self._observe_remaining(headers)

    def on_stream_cut(self) -> int | None:
        """A stream was cut mid-way while others were running: halve the concurrency (down to
        one). Returns the new limit when it was lowered, else None."""
        self._ok_since_cut = 0
        if self._in_flight <= 1:
            return None
        lowered = max(1, min(self.stream_cap, self._in_flight) // 2)
        if lowered >= self.stream_cap:
            return None
        self.stream_cap = lowered
        return lowered

    def on_rate_limited(self, retry_after: float | None) -> float:
        """Start (or extend) the global cooldown; returns its length in seconds."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        in_cooldown = now < self._cooldown_until
        # A burst of 429s from one instant is one signal, not one per refused worker.
        if not in_cooldown:
            self._consecutive_429 += 1
            if self.adaptive:
                self._slow_down()
        if retry_after is None:
            base = DEFAULT_COOLDOWN
            stated = self._stated_rpm()
            if stated:
                base = min(DEFAULT_COOLDOWN, PACED_COOLDOWN_SLOTS * 60.0 / stated)
            retry_after = min(MAX_COOLDOWN, base * 2 ** (self._consecutive_429 - 1))
        retry_after = min(MAX_COOLDOWN, max(0.0, retry_after))
        until = now + retry_after
        if until > self._cooldown_until:
            # Halve at most once per cooldown, for the same reason.
            if self.adaptive and not in_cooldown:
                self.window = max(1.0, self.window / 2.0)
            self._cool_until(until)
            self.cooldowns += 1
        return retry_after

    def _stated_rpm(self) -> float | None:
        """The ``--rpm`` requests are paced at, when the user stated it (not a discovered
        rate): this process's pacer's, or the shared limit's."""
        if self.adaptive:
            return None
        if self._shared is not None:
            return self._shared.rpm
        return self._rpm.per_second * 60.0 if self._rpm is not None else None

    def _slow_down(self) -> None:
        """A 429 without stated limits: pace (or pace slower) at a discovered rate."""
        if not self._ok_since_429:
            return
        self._ok_since_429 = False
        if self._rpm is not None:
            self._rpm.set_rate(max(DISCOVER_MIN_PER_SECOND,
                                   self._rpm.per_second * DISCOVER_DECREASE))
            self._probe_fast = False
            return
        if not self._burst_forgiven:
            # The first 429 may answer a start-up burst (every worker at once), not a rate:
            # the halved window and the cooldown answer that. A second one is a rate.
            self._burst_forgiven = True
            return
        seen = len(self._recent_sends)        # sends in the last second
        if seen >= 2:
            self._rpm = Pacer(max(DISCOVER_MIN_PER_SECOND, seen * DISCOVER_DECREASE),
                              spacing=True)

    def cool_until(self, until: float) -> None:
        """A cooldown until ``until`` (event-loop time) started elsewhere (another process
        sharing the limit): wait it out here too, without telling the others again."""
        if until > self._cooldown_until:
            self._cool_until(until, tell=False)

    def _cool_until(self, until: float, *, tell: bool = True) -> None:
        self._cooldown_until = until
        for pacer in (self._rpm, self._tpm):
            if pacer is not None:
                pacer.push_back(until)
        if tell and self._shared is not None:
            self._shared.cooldown(until - asyncio.get_running_loop().time())

    def _observe_remaining(self, headers: Mapping[str, str]) -> None:
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is None:
                continue
            try:
                left = float(remaining)
            except ValueError:
                continue
            if left > 0:
                continue
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", "")) or 0.0
            limit_text = headers.get(f"x-ratelimit-limit-{kind}", "")
            try:
                refill = 60.0 / float(limit_text) if kind == "requests" else reset
            except (ValueError, ZeroDivisionError):
                refill = reset
            wait = min(reset, refill, 1.0) if reset else min(refill, 1.0)
            if wait > 0 and not math.isnan(wait):
                until = asyncio.get_running_loop().time() + wait
                if until > self._cooldown_until:
                    self._cool_until(until)


class _Slot:
    __slots__ = ("_throttle",)

    def __init__(self, throttle: Throttle) -> None:
        self._throttle = throttle

    async def __aenter__(self) -> None:
        await self._throttle._enter_slot()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._throttle._exit_slot()
