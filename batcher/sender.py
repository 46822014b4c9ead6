"""The one request path: pace → send → parse → decide retry → feed the throttle back.

Every caller that sends requests uses a :class:`Sender` (the live engine's workers and
``estimate --sample``); none has a send loop of its own. A sender owns the throttle's
feedback (429 cooldowns, cut streams, remaining-quota headers), the retry policy (tenacity,
by error type; a rate-limit 429 is not an attempt) and the server-down watch. It knows
nothing of rows' results, the state or the budget: it returns what happened.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from structlog.typing import FilteringBoundLogger as Logger

from batcher.errors import (
    Aborted,
    JobFatal,
    ProviderError,
    RateLimited,
    Retryable,
    SchemaCut,
    SchemaError,
    ServerDown,
    StreamCut,
)
from batcher.limits import Throttle
from batcher.providers import Provider
from batcher.results import Failed, Sent
from batcher.retry import retrying
from batcher.types import Answer, HttpRequest, HttpResponse, RequestRow

if TYPE_CHECKING:
    from batcher.http1 import PlainTransport
    from batcher.pool import Transport


class Counters(Protocol):
    """The live counters a sender keeps up to date (the runner's progress has them)."""

    in_flight: int
    retries: int
    rate_limited: int


class _NoCounters:
    in_flight = 0
    retries = 0
    rate_limited = 0


class StopRequested(Exception):
    """Raised inside a row's retry loop once the job is stopping: the row is left for resume."""


class Sender:
    """Sends requests for one job; see the module docstring.

    ``abort(exc)`` is called with an error that ends the job (auth, quota, server down);
    ``stop`` is set when the job stops (a waiting retry then gives its row up at once);
    ``on_success()`` runs after every answered request. ``sending`` holds the tasks from
    their send until their answer is handed back: what a stop grants its grace to.
    """

    def __init__(self, *, throttle: Throttle, transport: Transport | PlainTransport,
                 max_attempts: int,
                 max_rate_limit_wait: float = math.inf, server_down_after: float = math.inf,
                 base_url: str = "", log: Logger, abort: Callable[[Aborted | JobFatal], None],
                 stop: asyncio.Event, counters: Counters | None = None,
                 on_first_send: Callable[[], None] | None = None,
                 on_success: Callable[[], None] | None = None) -> None:
        self.throttle = throttle
        self.transport = transport
        self.max_attempts = max_attempts
        self.max_rate_limit_wait = max_rate_limit_wait
        self.server_down_after = server_down_after
        self.base_url = base_url
        self.sending: set[asyncio.Task[object]] = set()
        self.successes = 0
        self._log = log
        self._abort = abort
        self._stop = stop
        self._counters: Counters = counters if counters is not None else _NoCounters()
        self._on_first_send = on_first_send
        self._on_success = on_success
        now = asyncio.get_running_loop().time()
        self._last_success = now
        self._last_answer = 0.0
        """When the server last answered 429 (a refusal proves it is up)."""
        self._warned_only_429 = 0.0

    async def send(self, row: RequestRow, provider: Provider, request: HttpRequest,
                   tokens: int) -> Sent | Failed | None:
        """Send until answered, a non-retryable error, ``max_attempts`` failed sends (a
        rate-limit 429 is not one) or ``max_rate_limit_wait`` seconds of 429s. None when the
        job stopped or aborted first (the row stays pending).

        The first attempt runs outside tenacity (the common case, and tenacity's
        bookkeeping costs about as much as our own per-row work); only after a retryable
        error does the policy take over, its first "attempt" replaying that error so that
        waits and attempt counts are tenacity's."""
        started = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        attempts = 0
        response: HttpResponse | None = None
        first_error: Retryable | None = None
        wire: list[float] = []
        try:
            try:
                attempts = 1
                response, answer = await self._attempt(row, provider, request, tokens, task,
                                                       wire)
            except Retryable as exc:
                if self.max_attempts == 1 and not isinstance(exc, RateLimited):
                    raise
                first_error = exc
            if first_error is not None:
                throttle = self.throttle
                async for attempt in retrying(self.max_attempts, sleep=self._sleep,
                                              max_rate_limit_wait=self.max_rate_limit_wait,
                                              paced=lambda: throttle.paced):
                    with attempt:
                        if first_error is not None:
                            replay, first_error = first_error, None
                            raise replay
                        if self._stop.is_set():
                            raise StopRequested
                        attempts += 1
                        self._counters.retries += 1
                        response, answer = await self._attempt(row, provider, request,
                                                               tokens, task, wire, first=True)
        except JobFatal as exc:
            self._abort(exc)
            return None
        except StopRequested:
            return None
        except RateLimited as exc:
            exc.message = (f"still rate limited after {self.max_rate_limit_wait:g} s of 429s "
                           f"(--max-rate-limit-wait): {exc.message}")
            return Failed(exc, attempts, *_timing(started, wire), response)
        except ProviderError as exc:
            return Failed(exc, attempts, *_timing(started, wire), response)
        finally:
            self.sending.discard(task)
        # No await from here to delivery: a stop cannot lose an answer that was paid for.
        assert response is not None  # the successful attempt set it
        return Sent(response, answer, attempts, *_timing(started, wire))

    async def _attempt(self, row: RequestRow, provider: Provider, request: HttpRequest,
                       tokens: int, task: asyncio.Task[object], wire: list[float], *,
                       first: bool = False) -> tuple[HttpResponse, Answer]:
        """One send and parse; feeds the throttle; raises the typed error of a failure.

        The task is in ``sending`` from its send until its answer is handed back; not while
        it waits for a place, a cooldown, the pacer or a retry, so a stop cancels such
        waiters at once. Between the pacer's release and the send nothing is awaited, so
        sends keep the pacer's spacing. ``wire`` gets the send's duration (ms). ``first``: a
        retry, which takes the pacer's next free slot ahead of new rows."""
        throttle = self.throttle
        counters = self._counters
        async with throttle.slot():
            await throttle.acquire(tokens, first=first)
            if self._stop.is_set():
                raise StopRequested
            self.sending.add(task)
            try:
                if self._on_first_send is not None:
                    hook, self._on_first_send = self._on_first_send, None
                    hook()
                counters.in_flight += 1
                sent_at = time.perf_counter()
                try:
                    response = await self.transport.send(request)
                except Retryable:
                    self._check_server_down()
                    raise
                finally:
                    wire.append(_ms_since(sent_at))
                    counters.in_flight -= 1
                answer = self._parse(row, provider, request, response)
            except BaseException:
                self.sending.discard(task)
                raise
        self._last_success = asyncio.get_running_loop().time()
        self.successes += 1
        if self._on_success is not None:
            self._on_success()
        throttle.on_success(response.headers)
        throttle.settle_tokens(tokens, answer.usage.total_tokens,
                               explicit_max=request.max_tokens is not None)
        return response, answer

    def _parse(self, row: RequestRow, provider: Provider, request: HttpRequest,
               response: HttpResponse) -> Answer:
        """The answer in ``response``, or its typed error after feeding it to the throttle
        (a 429's cooldown, a cut stream's lower concurrency) and the server-down watch."""
        throttle = self.throttle
        try:
            return provider.parse_response(request, response)
        except (SchemaError, SchemaCut):
            # The model's answer does not fit the schema: the server is up all the same.
            self._last_answer = asyncio.get_running_loop().time()
            raise
        except RateLimited as exc:
            self._counters.rate_limited += 1
            wait = throttle.on_rate_limited(exc.retry_after)
            self._log.debug("rate_limited", id=row.id, cooldown_s=round(wait, 3))
            self._on_rate_limited()
            raise
        except StreamCut:
            lowered = throttle.on_stream_cut()
            if lowered is not None:
                self._log.warning("streams_cut", concurrency=lowered,
                                  note="streams are cut while others start (a server that "
                                       "interrupts a stream for a new request): fewer "
                                       "requests in flight")
            self._check_server_down()
            raise
        except Retryable:
            self._check_server_down()
            raise

    def _on_rate_limited(self) -> None:
        """A 429 is the server answering: it is not down. Say so when nothing but 429s has
        come back for the server-down time, once per such stretch."""
        now = asyncio.get_running_loop().time()
        self._last_answer = now
        quiet = now - max(self._last_success, self._warned_only_429)
        if quiet > self.server_down_after:
            self._warned_only_429 = now
            rpm = self.throttle.rpm
            pacing = f"; pacing at {rpm:.1f}/min" if rpm else ""
            self._log.warning(
                "only_rate_limited", seconds=round(now - self._last_success),
                note=f"every answer for {now - self._last_success:.0f} s was 429 (rate limited)"
                     f"{pacing}: the limit is lower than the requests sent; batcher keeps "
                     f"waiting, and a row gives up after --max-rate-limit-wait "
                     f"{self.max_rate_limit_wait:g} s")

    async def _sleep(self, seconds: float) -> None:
        """Backoff sleep that ends early (and gives the row up) when the job stops."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise StopRequested

    def _check_server_down(self) -> None:
        """No success (and no 429: a server that refuses is up) for ``server_down_after``
        seconds while requests fail to connect or get 5xx: abort, exit 3."""
        quiet = asyncio.get_running_loop().time() - max(self._last_success, self._last_answer)
        if quiet > self.server_down_after:
            self._abort(ServerDown(
                f"the server looks down: no request has succeeded for {quiet:.0f} s "
                f"(limit {self.server_down_after:g} s). Rerun the same command to resume"))


def _timing(started: float, wire: list[float]) -> tuple[float | None, float | None]:
    """(latency_ms, wait_ms) of a request: its last send's time on the wire, and the rest of
    the time since ``started`` (None, None when nothing was sent)."""
    if not wire:
        return None, None
    latency = wire[-1]
    return latency, round(max(0.0, _ms_since(started) - latency), 3)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
