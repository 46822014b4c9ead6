"""Throttle and retry policy, on a virtual clock: rates, per-second windows, cooldowns, AIMD."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections import Counter

import pytest
from tenacity import RetryCallState

from batcher.errors import BadRequest, RateLimited, ServerError
from batcher.limits import SLICE_WINDOW, TIMER_SLACK, Pacer, Throttle
from batcher.retry import (
    retrying,
    stop_after_failures_or_rate_limit_wait,
    wait_advised_or_jitter,
)
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


def test_rpm_delivers_over_99_percent_and_never_exceeds_any_one_second_slice() -> None:
    throttle = Throttle(rpm=6000, tpm=None, concurrency=50)
    times = _send_times(throttle, 3000)
    duration = max(times) - min(times)
    rate_per_minute = (len(times) - 1) / duration * 60
    assert rate_per_minute >= 0.99 * 6000
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


def test_a_paced_retry_of_a_5xx_does_not_back_off_but_a_429_and_advice_still_wait() -> None:
    paced = True
    wait = wait_advised_or_jitter(base=0.5, cap=30.0, rng=random.Random(3),
                                  paced=lambda: paced)
    assert [wait(_state(ServerError("boom", 503), n)) for n in (1, 2, 5)] == [0.0, 0.0, 0.0]
    assert 2.0 <= wait(_state(ServerError("busy", 503, retry_after=2.0), 1)) <= 2.2
    assert max(wait(_state(RateLimited("slow down", 429), 3)) for _ in range(50)) > 0.0
    paced = False                            # no pacer (yet): the backoff is the wait again
    assert max(wait(_state(ServerError("boom", 503), 3)) for _ in range(50)) > 0.0


def test_a_retry_takes_the_next_free_slot_ahead_of_the_rows_already_waiting() -> None:
    # 600 RPM = 10 a second; 40 rows wait from the start (4 s of schedule). A retry that
    # comes at 1.0 s leaves within a slot or two, not behind the 30 still queued, and the
    # rate stays the limit's: the schedule moves back by the slot the retry took.
    async def main() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        throttle = Throttle(rpm=600, tpm=None, concurrency=64)
        times: list[float] = []
        retry_at: list[float] = []

        async def row() -> None:
            await throttle.acquire()
            times.append(loop.time())

        async def retry() -> None:
            await asyncio.sleep(1.0)
            await throttle.acquire(first=True)
            retry_at.append(loop.time())
            times.append(loop.time())

        await asyncio.gather(*(row() for _ in range(40)), retry())
        return sorted(times), retry_at[0]

    times, retry_at = run_virtual(main)
    assert 1.0 <= retry_at <= 1.0 + 2 * 0.1, retry_at
    assert len(times) == 41
    assert times[-1] == pytest.approx(40 / (10 * 0.995), abs=0.15)   # 41 sends, 10 a second
    for phase in (0.0, 0.25, 0.5, 0.75):
        assert max(Counter(int(t + phase) for t in times).values()) <= 10, phase
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.1 - TIMER_SLACK - 1e-9


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


# --- strict limiters (issue 18) -----------------------------------------------------------


def _busy(seconds: float) -> None:
    """Block the (virtual) event loop, as CPU work between awaits does: wake-ups come late."""
    loop = asyncio.get_running_loop()
    loop._virtual_now += seconds  # type: ignore[attr-defined]


def _send_times_on_a_busy_loop(rpm: int, n: int, workers: int, *, seed: int,
                               every: tuple[float, float],
                               block: tuple[float, float]) -> list[float]:
    """Release times of ``n`` sends at ``rpm`` while the loop is blocked now and then (for
    ``block`` seconds, every ``every`` seconds; uniform ranges): the waiters behind a block
    all wake late, in one turn of the loop."""
    rng = random.Random(seed)

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        throttle = Throttle(rpm=rpm, tpm=None, concurrency=workers)
        times: list[float] = []
        remaining = iter(range(n))

        async def worker() -> None:
            for _ in remaining:
                await throttle.acquire()
                times.append(loop.time())

        async def noise() -> None:
            while len(times) < n:
                await asyncio.sleep(rng.uniform(*every))
                _busy(rng.uniform(*block))

        await asyncio.gather(noise(), *(worker() for _ in range(workers)))
        return times

    return run_virtual(main)


def test_late_wake_ups_never_bunch_two_sends_closer_than_the_limits_interval() -> None:
    # The loop is blocked past several slots now and then.
    times = _send_times_on_a_busy_loop(1200, 600, 32, seed=7, every=(0.2, 1.0),
                                       block=(0.05, 0.15))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Never closer than the interval less the millisecond of timer slack (TIMER_SLACK):
    # without the floor, waiters released in one turn of the loop leave 0 s apart.
    assert min(gaps) >= 60 / 1200 - TIMER_SLACK - 1e-9, min(gaps)
    rate = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert 0.8 * 1200 <= rate <= 1200, rate


def test_late_wake_ups_never_put_more_than_the_limit_into_a_one_second_slice() -> None:
    # 6,000 RPM = 100 a second, on a loop that is blocked for 5-40 ms every 50-300 ms: the
    # waiters behind each block catch up, and without the pacer's window (SLICE_WINDOW) the
    # catching up packs more than 100 sends into some one-second slice.
    times = _send_times_on_a_busy_loop(6000, 6000, 64, seed=11, every=(0.05, 0.3),
                                       block=(0.005, 0.04))
    for phase in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9):
        per_slice = Counter(int(t + phase) for t in times)
        assert max(per_slice.values()) <= 100, (phase, max(per_slice.values()))
    # Any window of a second, wherever it starts (the server's clock is not ours).
    assert all(b - a >= 1.0 for a, b in zip(times, times[100:], strict=False))
    rate = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert rate >= 0.95 * 6000, rate


def test_a_cooldown_pushes_the_schedule_back_and_releases_no_crowd() -> None:
    async def main() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        throttle = Throttle(rpm=1200, tpm=None, concurrency=20)
        times: list[float] = []
        remaining = iter(range(100))
        refused_at = 0.0

        async def worker() -> None:
            nonlocal refused_at
            for n in remaining:
                await throttle.acquire()
                times.append(loop.time())
                if n == 20:                      # one 429 with a 1 s Retry-After
                    refused_at = loop.time()
                    throttle.on_rate_limited(1.0)

        await asyncio.gather(*(worker() for _ in range(20)))
        return times, refused_at

    times, refused_at = run_virtual(main)
    during = [t for t in times if refused_at < t < refused_at + 1.0]
    assert during == []                          # nobody goes inside the cooldown
    after = [t for t in times if t >= refused_at + 1.0]
    assert len(after) == 100 - 21
    gaps = [b - a for a, b in itertools.pairwise(after)]
    assert min(gaps) >= 60 / 1200 - TIMER_SLACK - 1e-9   # spaced at once, not 19 in a heap


def _strict_limiter_run(seconds: float, per_second: float, workers: int = 50
                        ) -> tuple[int, int, Throttle]:
    """Drive an unconfigured throttle against a limiter that admits a request only when
    1/per_second has passed since the last admitted one (nginx limit_req, no burst)."""
    async def main() -> tuple[int, int, Throttle]:
        loop = asyncio.get_running_loop()
        throttle = Throttle(rpm=None, tpm=None, concurrency=workers)
        last_admitted = -math.inf
        ok = refused = 0

        async def worker() -> None:
            nonlocal last_admitted, ok, refused
            while loop.time() < seconds:
                async with throttle.slot():
                    await throttle.acquire()
                    now = loop.time()
                    await asyncio.sleep(0.01)           # the server's latency
                if now - last_admitted >= 1.0 / per_second:
                    last_admitted = now
                    ok += 1
                    throttle.on_success({})
                else:
                    refused += 1
                    throttle.on_rate_limited(None)      # nginx sends no Retry-After

        await asyncio.gather(*(worker() for _ in range(workers)))
        return ok, refused, throttle

    return run_virtual(main)


def test_without_rpm_the_rate_is_discovered_on_a_strict_limiter() -> None:
    ok, refused, throttle = _strict_limiter_run(180.0, per_second=20.0)
    assert ok >= 0.75 * 20 * 180, ok             # converges instead of oscillating
    assert refused <= 0.05 * (ok + refused), (ok, refused)
    assert throttle.rpm is not None and throttle.rpm <= 1200 * 1.05


def test_a_discovered_rate_falls_to_a_very_low_limit() -> None:
    ok, refused, throttle = _strict_limiter_run(600.0, per_second=0.05, workers=8)  # 3/min
    assert ok >= 0.5 * 0.05 * 600 and refused <= 3 * ok, (ok, refused)
    assert throttle.rpm is not None and throttle.rpm <= 6.0


def test_streams_cut_while_others_run_halve_concurrency_down_to_one() -> None:
    async def main() -> list[int]:
        throttle = Throttle(rpm=1000, tpm=None, concurrency=16)
        caps = []
        slots = [throttle.slot() for _ in range(16)]
        for s in slots:
            await s.__aenter__()
        for _ in range(6):
            throttle.on_stream_cut()
            caps.append(throttle.stream_cap)
        for s in slots:
            await s.__aexit__(None, None, None)
        assert throttle.on_stream_cut() is None  # alone on the wire: not the pattern
        for _ in range(50):
            throttle.on_success({})
        caps.append(throttle.stream_cap)
        return caps

    assert run_virtual(main) == [8, 4, 2, 1, 1, 1, 2]


def test_a_lowered_cap_bounds_requests_in_flight_even_with_stated_limits() -> None:
    async def main() -> int:
        throttle = Throttle(rpm=60_000, tpm=None, concurrency=8)
        throttle.stream_cap = 2
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

    assert run_virtual(main) == 2


def test_rate_limits_do_not_count_as_attempts_and_are_bounded_by_time() -> None:
    clock = [0.0]
    stop = stop_after_failures_or_rate_limit_wait(3, 100.0, clock=lambda: clock[0])

    def outcome(exc: BaseException) -> bool:
        return stop(_state(exc, 1))

    assert not any(outcome(RateLimited("later", 429)) for _ in range(50))
    assert not outcome(ServerError("boom", 503))
    assert not outcome(ServerError("boom", 503))
    assert outcome(ServerError("boom", 503))            # the third failure that counts
    fresh = stop_after_failures_or_rate_limit_wait(3, 100.0, clock=lambda: clock[0])
    assert not fresh(_state(RateLimited("later", 429), 1))
    clock[0] = 99.0
    assert not fresh(_state(RateLimited("later", 429), 2))
    clock[0] = 100.0
    assert fresh(_state(RateLimited("later", 429), 3))  # 100 s of 429s: give the row up


def test_the_release_floor_is_the_spacing_and_the_window_for_one_or_several_releases() -> None:
    """What a caller pacing elsewhere (the Ray engine's cluster limiter) reads off a request
    pacer told of the releases: 5 a second, released at 0.0, 0.2, ... 0.8 s."""
    pacer = Pacer(5.0, spacing=True)
    assert pacer.floor() == -math.inf and pacer.window_floors(2) == [-math.inf] * 2
    for k in range(4):
        pacer.note_release(0.2 * k)
    # Four of five in the window: the next is bound by the spacing only, the one after
    # by the window (the first release + SLICE_WINDOW).
    assert pacer.window_floors(2) == [-math.inf, SLICE_WINDOW]
    pacer.note_release(0.8)
    assert pacer.floor() == max(0.8 + pacer.min_gap, SLICE_WINDOW)
    assert pacer.window_floors(3) == [0.2 * k + SLICE_WINDOW for k in range(3)]


def test_a_bare_429_while_paced_at_a_stated_rpm_cools_down_for_a_few_intervals() -> None:
    # Paced sends that meet a 429 with no advice met a strict gateway's interval: a few of
    # the limit's intervals, doubling while no success comes back, not a second each.
    async def main() -> tuple[list[float], float, float]:
        throttle = Throttle(rpm=2400, tpm=None, concurrency=4)
        waits = []
        for _ in range(3):
            waits.append(throttle.on_rate_limited(None))
            await throttle.wait_cooldown()
        throttle.on_success({})
        again = throttle.on_rate_limited(None)
        slow = Throttle(rpm=30, tpm=None, concurrency=4).on_rate_limited(None)
        return waits, again, slow

    waits, again, slow = run_virtual(main)
    interval = 60 / 2400
    assert waits == pytest.approx([4 * interval, 8 * interval, 16 * interval])
    assert again == pytest.approx(4 * interval)         # a success starts it over
    assert slow == 1.0                                   # never more than the default
