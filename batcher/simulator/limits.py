"""Per-minute limits as servers enforce them: in per-second slices (providers' RPM and TPM)
and as a strict minimum interval between admitted requests (gateways' nginx ``limit_req``)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimitView:
    """The state of one limit after a decision, for ``x-ratelimit-*`` headers.

    ``limit`` is the per-minute figure (as OpenAI reports it); ``remaining`` what is left
    in the current one-second slice; ``reset`` seconds until the next slice starts.
    """

    limit: float
    remaining: int
    reset: float


class SliceLimiter:
    """At most ``per_minute / 60`` units per one-second slice of the clock.

    Slice ``k`` covers clock seconds ``[k, k + 1)`` and allows
    ``floor((k + 1) r) - floor(k r)`` units with ``r = per_minute / 60``: exactly ``r`` when
    ``per_minute`` is a multiple of 60, and a fractional ``r`` averaged over slices (90 rpm
    allows 1, 2, 1, 2, …; 30 rpm allows 0, 1, 0, 1, …). Refused units take nothing.

    A single request bigger than any slice (a long prompt under a small TPM) is admitted
    into an unused slice; its excess is carried as debt into the following slices, so the
    average never exceeds the limit and no request is refused forever.
    """

    __slots__ = ("_debt", "_per_minute", "_rate", "_slice", "_used")

    def __init__(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        self._per_minute = per_minute
        self._rate = per_minute / 60.0
        self._slice = -1
        self._used = 0

    def _allowance(self, k: int) -> int:
        # The small epsilon keeps exact products (k * 50/3 for k = 3m) from flooring one low.
        return (math.floor((k + 1) * self._rate + 1e-9)
                - math.floor(k * self._rate + 1e-9))

    def _advance(self, k: int) -> None:
        if k == self._slice:
            return
        if self._slice >= 0 and self._used > 0:
            # Units beyond the old slice's allowance are paid by the slices in between.
            paid = math.floor(k * self._rate + 1e-9) - math.floor(self._slice * self._rate + 1e-9)
            self._used = max(0, self._used - paid)
        else:
            self._used = 0
        self._slice = k

    def fits(self, now: float, amount: int) -> bool:
        """Whether ``amount`` units may be taken at clock time ``now`` (seconds)."""
        k = math.floor(now)
        self._advance(k)
        return self._used + amount <= self._allowance(k) or (
            self._used == 0 and amount > math.ceil(self._rate))

    def take(self, now: float, amount: int) -> None:
        """Count ``amount`` units in the slice of ``now`` (call after :meth:`fits`)."""
        self._advance(math.floor(now))
        self._used += amount

    def try_take(self, now: float, amount: int) -> bool:
        """Take ``amount`` units at ``now`` if the slice allows it; refused units take nothing."""
        if self.fits(now, amount):
            self.take(now, amount)
            return True
        return False

    def view(self, now: float) -> LimitView:
        k = math.floor(now)
        self._advance(k)
        return LimitView(self._per_minute, max(0, self._allowance(k) - self._used),
                         k + 1 - now)

    def retry_after(self, now: float, amount: int) -> float:
        """Seconds from ``now`` until a refused ``amount`` could fit (an estimate when a
        debt or fractional rate spans several slices)."""
        k = math.floor(now)
        self._advance(k)
        need = self._used + min(amount, math.ceil(self._rate)) - self._allowance(k)
        extra = max(0, math.ceil(need / self._rate) - 1) if need > 0 else 0
        return (k + 1 - now) + extra


class IntervalLimiter:
    """At most one request per ``60 / per_minute`` seconds, with no burst.

    A request is admitted only if at least one interval has passed since the last *admitted*
    request; a refused request does not move the clock. This is nginx ``limit_req`` with no
    ``burst`` (``rate=20r/s`` admits one request per 50 ms, and a client that sends two at once
    gets one 429 however low its average rate is). The first request is always admitted.
    """

    __slots__ = ("_interval", "_last", "_per_minute")

    def __init__(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        self._per_minute = per_minute
        self._interval = 60.0 / per_minute
        self._last: float | None = None

    @property
    def interval(self) -> float:
        """Seconds that must pass between two admitted requests."""
        return self._interval

    def try_take(self, now: float) -> bool:
        """Admit a request at clock time ``now`` (seconds) if the interval has passed."""
        # The small epsilon keeps exact gaps (100.05 - 100.0 in floating point) from falling short.
        if self._last is not None and now - self._last < self._interval - 1e-9:
            return False
        self._last = now
        return True

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until a request would be admitted (0 when it would be now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self._interval - now)
