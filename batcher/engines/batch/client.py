"""HTTP calls to a Batch API: JSON in and out through the one transport, retried by error type.

Errors come out typed, decided once here: 401/403/quota → AuthError/QuotaExhausted (the job
aborts, exit 3); 404 on the batch routes → :class:`NoBatchApi` (exit 2: the server has no
Batch API); other 4xx → BadRequest; 5xx, 429 and transport errors are retried with backoff
(the server's Retry-After honoured) and end in :class:`BatchApiDown` (exit 3, resumable).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

import orjson

from batcher.errors import Aborted, ConfigError, ProviderError, Retryable
from batcher.pool import Transport
from batcher.providers.base import join_url, snippet
from batcher.types import JSON, HttpRequest, HttpResponse

CALL_ATTEMPTS = 6
"""Tries per Batch API call before the job stops (exit 3; a rerun picks up where it was)."""


class NoBatchApi(ConfigError):
    """The server answered 404 on the Batch API routes: it has none (exit 2)."""


class BatchApiDown(Aborted):
    """A Batch API call kept failing with retryable errors (exit 3, resumable)."""


class StopWaiting(Exception):
    """The job is stopping: a wait between tries was cut short."""


class BatchClient:
    """Calls ``{base_url}{path}`` with the job's auth headers. ``to_error`` turns a non-2xx
    response into the provider's typed error; ``stop`` cuts waits between tries short."""

    def __init__(self, transport: Transport, *, base_url: str, headers: Mapping[str, str],
                 to_error: Callable[[HttpResponse], ProviderError], stop: asyncio.Event,
                 first_wait: float = 1.0, attempts: int = CALL_ATTEMPTS) -> None:
        self._transport = transport
        self.base_url = base_url
        self._headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        self._to_error = to_error
        self._stop = stop
        self._first_wait = first_wait
        self._attempts = attempts

    def url(self, path: str) -> str:
        return join_url(self.base_url, path)

    async def json(self, method: str, path: str, body: JSON = None) -> JSON:
        """The decoded JSON answer of one call (``body`` sent as JSON when not None)."""
        data = b"" if body is None else orjson.dumps(body)
        response = await self.send(method, self.url(path), data, "application/json"
                                   if body is not None else None)
        try:
            decoded: JSON = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise BatchApiDown(f"{method} {path}: the answer is not JSON: "
                               f"{snippet(response.body)}") from None
        return decoded

    async def send(self, method: str, url: str, body: bytes = b"",
                   content_type: str | None = None) -> HttpResponse:
        """One call, tried up to ``attempts`` times on retryable errors."""
        headers = dict(self._headers)
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = HttpRequest(method, url, headers, body)
        wait = self._first_wait
        last: Retryable | None = None
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._transport.send(request)
                if 200 <= response.status < 300:
                    return response
                error = self._to_error(response)
                if response.status == 404 and _is_batch_route(url, self.base_url):
                    raise NoBatchApi(
                        f"the server at {self.base_url} has no Batch API ({method} "
                        f"{_path(url, self.base_url)} answered 404); use --mode live, or a "
                        "server that serves /files and /batches (or /messages/batches)")
                raise error
            except Retryable as exc:
                last = exc
            if attempt == self._attempts:
                break
            await self._pause(max(wait, last.retry_after or 0.0))
            wait = min(wait * 2, 30.0)
        assert last is not None
        raise BatchApiDown(f"the Batch API at {self.base_url} keeps failing ({last}); rerun "
                           "the same command to resume: submitted batches are not lost")

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set():
            raise StopWaiting


def _path(url: str, base_url: str) -> str:
    return url[len(base_url.rstrip("/")):] if url.startswith(base_url.rstrip("/")) else url


def _is_batch_route(url: str, base_url: str) -> bool:
    """The routes a server with a Batch API always has (not one batch's, which may be gone)."""
    path = _path(url, base_url).split("?", 1)[0].rstrip("/")
    return path in ("/files", "/batches", "/messages/batches")
