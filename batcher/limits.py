"""Pacing: RPM/TPM spaced evenly below the limit, global cooldowns, adaptive concurrency."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping
from types import TracebackType

from batcher.providers.base import parse_duration

HEADROOM = 0.985
"""Fraction of a stated limit that is used. Sends are spaced evenly at 98.5% of the limit, so
any one-second window of a provider that counts in per-second slices sees at most
floor(0.985 × limit) + 1 ≤ limit requests, while >97% of the limit is delivered."""

MAX_COOLDOWN = 60.0
DEFAULT_COOLDOWN = 1.0


class Pacer:
    """Spaces units (requests, or tokens) evenly at ``per_second`` × :data:`HEADROOM`.

    Each acquire reserves the next free instant and sleeps until it (the "theoretical arrival
    time" of GCRA). Why not a leaky bucket (aiolimiter): with a bucket small enough to never
    burst over a one-second slice (one request), every late wake-up of a waiter loses the time
    by which it was late, and delivery falls to ~88% of the limit; here a late wake-up loses
    nothing, because the next slot follows the previous slot, not "now". Idle time is not
    banked either: after a pause the next send is simply "now", never a burst.
    """

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / (per_second * HEADROOM)
        self._next = 0.0

    async def acquire(self, amount: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(self._next, now)
        self._next = start + amount * self.interval
        if start > now:
            await asyncio.sleep(start - now)

    def charge_later(self, amount: float) -> None:
        """Push the next free slot back by ``amount`` (units used beyond what was charged)."""
        self._next += amount * self.interval

    def refund(self, amount: float) -> None:
        """Give back ``amount`` units charged but not used (never earlier than now)."""
        loop = asyncio.get_running_loop()
        self._next = max(loop.time(), self._next - amount * self.interval)


class Throttle:
    """The gate every request passes before it is sent, shared by all workers.

    - ``rpm``/``tpm``: :class:`Pacer` values. TPM is charged with the request's prompt tokens
      plus its ``max_tokens`` before sending — as OpenAI counts a request on arrival — and
      corrected by :meth:`settle_tokens` with the usage the server reports (see there).
    - A 429 anywhere sets a *global* cooldown (the server's advice, else a doubling default)
      that every worker waits out before its next send, instead of each worker hammering.
    - ``x-ratelimit-remaining-*`` at zero cools down until one unit refills.
    - With no rpm/tpm given, concurrency adapts AIMD-style: halved on a 429, grown by one per
      window of successes, up to ``concurrency``.
    """

    def __init__(self, *, rpm: float | None, tpm: float | None, concurrency: int) -> None:
        self._rpm = Pacer(rpm / 60.0) if rpm else None
        self._tpm = Pacer(tpm / 60.0) if tpm else None
        self._cooldown_until = 0.0
        self._consecutive_429 = 0
        self.adaptive = rpm is None and tpm is None
        self.max_concurrency = concurrency
        self.window = float(concurrency)
        self._in_flight = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self.cooldowns = 0

    # --- dispatch -----------------------------------------------------------------------

    async def wait_cooldown(self) -> None:
        """Return once no global cooldown is in force (re-checked: another 429 may extend it)."""
        loop = asyncio.get_running_loop()
        while (delay := self._cooldown_until - loop.time()) > 0:
            await asyncio.sleep(delay)

    async def acquire(self, tokens: int = 0) -> None:
        """Wait for the cooldown, one request of the RPM budget and ``tokens`` of the TPM one."""
        await self.wait_cooldown()
        if self._rpm is not None:
            await self._rpm.acquire(1)
        if self._tpm is not None and tokens > 0:
            await self._tpm.acquire(tokens)

    def settle_tokens(self, charged: int, actual: int | None, *, explicit_max: bool) -> None:
        """Correct the TPM account with the usage the server reported.

        Tokens used beyond the charge are charged now (they delay later requests). Unused
        tokens are given back only when the charge rested on our own default for a missing
        ``max_tokens``: when the request carried ``max_tokens``, the provider counted all of
        it on arrival and gives nothing back, so neither do we."""
        if self._tpm is None or actual is None:
            return
        if actual > charged:
            self._tpm.charge_later(actual - charged)
        elif not explicit_max:
            self._tpm.refund(charged - actual)

    # --- adaptive concurrency (only when no limits were given) ----------------------------

    def slot(self) -> _Slot:
        """``async with throttle.slot():`` holds one of the adaptive concurrency window's places."""
        return _Slot(self)

    async def _enter_slot(self) -> None:
        # Fast path without any lock: a free place is simply taken (one event loop, no
        # await between the check and the increment).
        if not self.adaptive:
            return
        while self._in_flight >= max(1, int(self.window)):
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
        if not self.adaptive:
            return
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
        if self.adaptive and self.window < self.max_concurrency:
            self.window = min(float(self.max_concurrency), self.window + 1.0 / self.window)
        self._observe_remaining(headers)

    def on_rate_limited(self, retry_after: float | None) -> float:
        """Start (or extend) the global cooldown; returns its length in seconds."""
        loop = asyncio.get_running_loop()
        in_cooldown = loop.time() < self._cooldown_until
        # A burst of 429s from one instant is one signal, not one per refused worker.
        if not in_cooldown:
            self._consecutive_429 += 1
        if retry_after is None:
            retry_after = min(MAX_COOLDOWN, DEFAULT_COOLDOWN * 2 ** (self._consecutive_429 - 1))
        retry_after = min(MAX_COOLDOWN, max(0.0, retry_after))
        until = loop.time() + retry_after
        if until > self._cooldown_until:
            # Halve at most once per cooldown, for the same reason.
            if self.adaptive and not in_cooldown:
                self.window = max(1.0, self.window / 2.0)
            self._cooldown_until = until
            self.cooldowns += 1
        return retry_after

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
                loop = asyncio.get_running_loop()
                self._cooldown_until = max(self._cooldown_until, loop.time() + wait)


class _Slot:
    __slots__ = ("_throttle",)

    def __init__(self, throttle: Throttle) -> None:
        self._throttle = throttle

    async def __aenter__(self) -> None:
        await self._throttle._enter_slot()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._throttle._exit_slot()
