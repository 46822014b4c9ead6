"""Throttle and retry policy, on a virtual clock: rates, per-second windows, cooldowns, AIMD."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from tenacity import RetryCallState

from batcher.errors import BadRequest, RateLimited, ServerError
from batcher.limits import Throttle
from batcher.retry import retrying, wait_advised_or_jitter
from tests.virtual_clock import run_virtual


def _send_times(throttle: Throttle, n: int, tokens: int = 0, workers: int = 50) -> list[float]:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        times: list[float] = []
        remaining = iter(range(n))

        async def worker() -> None:
            for _ in remaining:
                await throttle.acquire(tokens)
                times.append(loop.time())

        await asyncio.gather(*(worker() for _ in range(workers)))
        return times

    return run_virtual(main)


def test_rpm_delivers_over_97_percent_and_never_exceeds_any_one_second_slice() -> None:
    throttle = Throttle(rpm=6000, tpm=None, concurrency=50)
    times = _send_times(throttle, 3000)
    duration = max(times) - min(times)
    rate_per_minute = (len(times) - 1) / duration * 60
    assert rate_per_minute >= 0.97 * 6000
    assert rate_per_minute <= 6000
    # A provider counting in per-second slices (whatever their phase) never sees >100.
    for phase in (0.0, 0.25, 0.5, 0.75):
        per_slice = Counter(int(t + phase) for t in times)
        assert max(per_slice.values()) <= 100, phase


def test_tpm_spaces_requests_by_their_estimated_tokens() -> None:
    # 60,000 TPM = 1,000 tokens/s; 40 requests of 500 tokens need about 20 s.
    throttle = Throttle(rpm=None, tpm=60_000, concurrency=10)
    times = _send_times(throttle, 40, tokens=500, workers=10)
    assert 19.0 <= max(times) <= 21.0
    per_second = Counter(int(t) for t in times)
    assert max(per_second.values()) * 500 <= 1000


def test_settle_charges_overruns_and_refunds_only_our_own_default() -> None:
    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        throttle = Throttle(rpm=None, tpm=60_000, concurrency=1)

        async def wait_for_next() -> float:
            start = loop.time()
            await throttle.acquire(1)
            return loop.time() - start

        await throttle.acquire(500)
        throttle.settle_tokens(500, 10, explicit_max=True)     # provider counted max_tokens
        kept = await wait_for_next()
        await throttle.acquire(500)
        throttle.settle_tokens(500, 10, explicit_max=False)    # our default: give it back
        refunded = await wait_for_next()
        await throttle.acquire(500)
        throttle.settle_tokens(500, 2500, explicit_max=True)   # 2,000 more than charged
        overrun = await wait_for_next()
        return kept, refunded, overrun

    kept, refunded, overrun = run_virtual(main)
    assert kept >= 0.45
    assert refunded < 0.05
    assert overrun >= 2.4


def test_rate_limited_starts_one_global_cooldown_for_every_worker() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        throttle = Throttle(rpm=None, tpm=None, concurrency=8)
        assert throttle.on_rate_limited(2.5) == 2.5
        starts: list[float] = []

        async def worker() -> None:
            await throttle.acquire()
            starts.append(loop.time())

        await asyncio.gather(*(worker() for _ in range(8)))
        return starts

    starts = run_virtual(main)
    assert len(starts) == 8
    assert min(starts) >= 2.5


def test_cooldown_without_advice_doubles_across_cooldowns_and_is_capped() -> None:
    async def main() -> tuple[list[float], list[float]]:
        throttle = Throttle(rpm=None, tpm=None, concurrency=4)
        burst = [throttle.on_rate_limited(None) for _ in range(8)]   # one instant: one signal
        waits = []
        for _ in range(8):
            await throttle.wait_cooldown()
            waits.append(throttle.on_rate_limited(None))
        return burst, waits

    burst, waits = run_virtual(main)
    assert burst == [1.0] * 8
    assert waits[:4] == [2.0, 4.0, 8.0, 16.0]
    assert max(waits) == 60.0


def test_adaptive_window_halves_once_per_cooldown_and_grows_back() -> None:
    async def main() -> tuple[float, float, float]:
        throttle = Throttle(rpm=None, tpm=None, concurrency=64)
        for _ in range(20):                       # one burst of 429s = one signal
            throttle.on_rate_limited(1.0)
        after_burst = throttle.window
        await asyncio.sleep(1.5)
        throttle.on_rate_limited(1.0)             # a later 429: halves again
        after_second = throttle.window
        for _ in range(2000):
            throttle.on_success({})
        return after_burst, after_second, throttle.window

    after_burst, after_second, recovered = run_virtual(main)
    assert after_burst == 32
    assert after_second == 16
    assert recovered == 64


def test_adaptive_window_bounds_requests_in_flight() -> None:
    async def main() -> int:
        throttle = Throttle(rpm=None, tpm=None, concurrency=8)
        throttle.window = 3
        in_flight = peak = 0

        async def request() -> None:
            nonlocal in_flight, peak
            async with throttle.slot():
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.1)
                in_flight -= 1

        await asyncio.gather(*(request() for _ in range(20)))
        return peak

    assert run_virtual(main) == 3


def test_remaining_zero_header_pauses_dispatch() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        throttle = Throttle(rpm=None, tpm=None, concurrency=4)
        throttle.on_success({"x-ratelimit-remaining-requests": "0",
                             "x-ratelimit-limit-requests": "120",
                             "x-ratelimit-reset-requests": "6m0s"})
        start = loop.time()
        await throttle.acquire()
        return loop.time() - start

    # one request refills in 60/120 = 0.5 s: wait that, not the 6 minutes to a full bucket
    assert run_virtual(main) == pytest.approx(0.5, abs=0.01)


def _state(exc: BaseException, attempt: int) -> RetryCallState:
    policy = retrying(5)
    state = RetryCallState(policy, None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


def test_wait_honours_retry_after_with_small_jitter() -> None:
    wait = wait_advised_or_jitter(rng=random.Random(1))
    for _ in range(50):
        seconds = wait(_state(RateLimited("slow down", 429, retry_after=2.0), 1))
        assert 2.0 <= seconds <= 2.2


def test_wait_without_advice_is_full_jitter_exponential_and_capped() -> None:
    wait = wait_advised_or_jitter(base=0.5, cap=30.0, rng=random.Random(2))
    for attempt, ceiling in ((1, 0.5), (3, 2.0), (10, 30.0)):
        samples = [wait(_state(ServerError("boom", 503), attempt)) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8      # full jitter spreads up to the ceiling


def test_policy_retries_only_retryable_errors() -> None:
    async def main() -> tuple[int, int]:
        calls = {"retryable": 0, "fatal": 0}

        async def attempt_all(kind: str, exc: Exception) -> None:
            policy = retrying(4, base=0.001, cap=0.001)
            async for attempt in policy:
                with attempt:
                    calls[kind] += 1
                    raise exc

        with pytest.raises(ServerError):
            await attempt_all("retryable", ServerError("boom", 502))
        with pytest.raises(BadRequest):
            await attempt_all("fatal", BadRequest("bad", 400))
        return calls["retryable"], calls["fatal"]

    assert run_virtual(main) == (4, 1)
