"""The retry policy (tenacity), decided by error types alone: Retryable errors are retried.

A rate-limit 429 is the server saying "later", not a failed attempt: it does not count
against ``max_attempts``; a row stops being retried after ``max_rate_limit_wait`` seconds of
429s instead (the wait itself is the throttle's global cooldown and pacing)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from batcher.errors import RateLimited, Retryable

BACKOFF_BASE = 0.5
"""Seconds; attempt n waits a uniformly random time in [0, min(cap, base × 2^(n-1))]."""
BACKOFF_CAP = 30.0
ADVICE_JITTER = 0.1
"""When the server says how long to wait, wait that plus up to 10% more, so that the workers
that were refused together do not all come back in the same millisecond."""


class wait_advised_or_jitter(wait_base):
    """Honour the server's ``retry_after`` when the error carries one; otherwise exponential
    backoff with full jitter, capped; but no wait at all for an error other than a 429 while
    ``paced()`` (requests are paced): the retry takes the request pacer's next free slot,
    ahead of new rows. With rows waiting, a backoff would not lower what the server gets
    (the pacer keeps that at the limit) but only leave the slot to a new row, and at the end
    of a job it would leave slots unused while the row waits."""

    def __init__(self, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
                 rng: random.Random | None = None,
                 paced: Callable[[], bool] | None = None) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()
        self.paced = paced

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, Retryable) and exc.retry_after is not None:
            advised = min(exc.retry_after, BACKOFF_CAP * 4)
            return advised * (1.0 + self.rng.uniform(0.0, ADVICE_JITTER))
        if self.paced is not None and not isinstance(exc, RateLimited) and self.paced():
            return 0.0
        ceiling = min(self.cap, self.base * 2 ** (retry_state.attempt_number - 1))
        return self.rng.uniform(0.0, ceiling)


class stop_after_failures_or_rate_limit_wait(stop_base):
    """Stop after ``max_attempts`` failures that are not rate-limit 429s, or once the row
    has been answered 429 for ``max_rate_limit_wait`` seconds since its first 429. One
    instance per row (it counts)."""

    def __init__(self, max_attempts: int, max_rate_limit_wait: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_attempts = max_attempts
        self.max_rate_limit_wait = max_rate_limit_wait
        self.clock = clock
        self.failures = 0
        self.limited_since: float | None = None

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is not None and isinstance(outcome.exception(), RateLimited):
            now = self.clock()
            if self.limited_since is None:
                self.limited_since = now
            return now - self.limited_since >= self.max_rate_limit_wait
        self.failures += 1
        return self.failures >= self.max_attempts


def retrying(max_attempts: int, *, max_rate_limit_wait: float = math.inf,
             base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
             sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
             paced: Callable[[], bool] | None = None) -> AsyncRetrying:
    """A fresh policy for one row: at most ``max_attempts`` failed sends, 429s aside (see
    :class:`stop_after_failures_or_rate_limit_wait`); only :class:`Retryable` errors are
    retried; the last error is re-raised as itself. ``sleep`` waits between attempts (the
    runner's ends early when the job stops); ``paced`` says whether requests are paced (see
    :class:`wait_advised_or_jitter`)."""
    return AsyncRetrying(
        stop=stop_after_failures_or_rate_limit_wait(max_attempts, max_rate_limit_wait),
        retry=retry_if_exception_type(Retryable),
        wait=wait_advised_or_jitter(base, cap, paced=paced),
        reraise=True,
        sleep=sleep,
    )
