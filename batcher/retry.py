"""The retry policy (tenacity), decided by error types alone: Retryable errors are retried."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.wait import wait_base

from batcher.errors import Retryable

BACKOFF_BASE = 0.5
"""Seconds; attempt n waits a uniformly random time in [0, min(cap, base × 2^(n-1))]."""
BACKOFF_CAP = 30.0
ADVICE_JITTER = 0.1
"""When the server says how long to wait, wait that plus up to 10% more, so that the workers
that were refused together do not all come back in the same millisecond."""


class wait_advised_or_jitter(wait_base):
    """Honour the server's ``retry_after`` when the error carries one; otherwise exponential
    backoff with full jitter, capped."""

    def __init__(self, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
                 rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, Retryable) and exc.retry_after is not None:
            advised = min(exc.retry_after, BACKOFF_CAP * 4)
            return advised * (1.0 + self.rng.uniform(0.0, ADVICE_JITTER))
        ceiling = min(self.cap, self.base * 2 ** (retry_state.attempt_number - 1))
        return self.rng.uniform(0.0, ceiling)


def retrying(max_attempts: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
             sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> AsyncRetrying:
    """A fresh policy for one row: at most ``max_attempts`` sends; only :class:`Retryable`
    errors are retried; the last error is re-raised as itself. ``sleep`` waits between
    attempts (the runner's ends early when the job stops)."""
    return AsyncRetrying(
        stop=stop_after_attempt(max_attempts),
        retry=retry_if_exception_type(Retryable),
        wait=wait_advised_or_jitter(base, cap),
        reraise=True,
        sleep=sleep,
    )
