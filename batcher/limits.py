"""Pacing: RPM/TPM (aiolimiter) smoothed to sub-second slices, global cooldowns, adaptive concurrency."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping
from types import TracebackType

from aiolimiter import AsyncLimiter

from batcher.providers.base import parse_duration

HEADROOM = 0.985
"""Fraction of a stated limit that is used: what a leaky bucket lets through in any one-second
window is burst + rate, so rate = 98.5% of the limit plus a 1% burst keeps every window of a
provider that enforces per-second slices under its limit, while delivering >97% of it."""

BURST = 0.01
"""Bucket capacity as a fraction of one second's allowance (at least one request)."""

TPM_SLICE = 0.25
"""TPM bucket capacity in seconds of allowance; bigger requests are charged in pieces."""

MAX_COOLDOWN = 60.0
DEFAULT_COOLDOWN = 1.0


def _bucket(per_second: float, capacity_seconds: float) -> AsyncLimiter:
    """A leaky bucket that drains at HEADROOM × ``per_second`` and holds ``capacity_seconds``
    of allowance (at least one unit)."""
    capacity = max(1.0, per_second * capacity_seconds)
    return AsyncLimiter(capacity, capacity / (per_second * HEADROOM))


class Throttle:
    """The gate every request passes before it is sent, shared by all workers.

    - ``rpm``/``tpm``: leaky buckets sized as described at :data:`HEADROOM`. TPM is charged
      with the request's estimated tokens before sending and corrected by :meth:`settle_tokens`
      with the usage the server reports.
    - A 429 anywhere sets a *global* cooldown (the server's advice, else a doubling default)
      that every worker waits out before its next send, instead of each worker hammering.
    - ``x-ratelimit-remaining-*`` at zero cools down until one unit refills.
    - With no rpm/tpm given, concurrency adapts AIMD-style: halved on a 429, grown by one per
      window of successes, up to ``concurrency``.
    """

    def __init__(self, *, rpm: float | None, tpm: float | None, concurrency: int) -> None:
        self._rpm = _bucket(rpm / 60.0, BURST) if rpm else None
        self._tpm = _bucket(tpm / 60.0, TPM_SLICE) if tpm else None
        self._cooldown_until = 0.0
        self._token_debt = 0
        self._tpm_lock = asyncio.Lock()
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
        debt, self._token_debt = self._token_debt, 0
        await self._charge_tokens(tokens + debt)

    def settle_tokens(self, estimated: int, actual: int | None) -> None:
        """Correct the TPM account with the usage the server reported: unused tokens are
        given back now; an overrun becomes a debt charged before the next request."""
        if self._tpm is None or actual is None:
            return
        diff = actual - estimated
        if diff > 0:
            self._token_debt += diff
        elif diff < 0:
            # aiolimiter has no refund; lowering its level gives back capacity that was
            # charged but not used (the bucket then leaks from the lower level).
            self._tpm._leak()
            self._tpm._level = max(0.0, self._tpm._level + diff)

    async def _charge_tokens(self, tokens: int) -> None:
        """Charge TPM in pieces no bigger than the bucket (aiolimiter refuses bigger ones).
        One request's pieces are charged under a lock: interleaved with other requests'
        pieces, many requests would complete their charge in the same instant (a burst)."""
        if self._tpm is None or tokens <= 0:
            return
        async with self._tpm_lock:
            remaining = float(tokens)
            while remaining > 0:
                piece = min(remaining, self._tpm.max_rate)
                await self._tpm.acquire(piece)
                remaining -= piece

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
        self._consecutive_429 += 1
        if retry_after is None:
            retry_after = min(MAX_COOLDOWN, DEFAULT_COOLDOWN * 2 ** (self._consecutive_429 - 1))
        retry_after = min(MAX_COOLDOWN, max(0.0, retry_after))
        until = loop.time() + retry_after
        if until > self._cooldown_until:
            # Halve at most once per cooldown: many 429s from one burst are one signal.
            if self.adaptive and loop.time() >= self._cooldown_until:
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
