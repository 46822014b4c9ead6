"""The only aiohttp code: one keep-alive session; aiohttp/OS errors become TransportError here, once."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

import aiohttp

from batcher.errors import StreamCut, TransportError
from batcher.types import HttpRequest, HttpResponse


class Transport:
    """Sends :class:`HttpRequest` values and returns whole :class:`HttpResponse` values.

    Contract: ``send`` either returns a response (any status) or raises
    :class:`TransportError` — for timeouts (``timeout`` seconds for the whole exchange,
    connect included, so a socket that never answers is abandoned), refused or reset
    connections and bodies cut mid-way. It never retries; the caller's policy does.
    ``concurrency`` bounds open connections (keep-alive, reused across requests).
    """

    def __init__(self, *, concurrency: int, timeout: float) -> None:
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 30.0))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(limit=self._concurrency, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=True,
            skip_auto_headers=("User-Agent",), headers={"User-Agent": "batcher"},
            raise_for_status=False,
            # No cookies in an API client; skipping the jar is ~15% of aiohttp's per-request CPU.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: HttpRequest) -> HttpResponse:
        session = self._session
        if session is None:
            raise RuntimeError("Transport used outside 'async with'")
        started = time.perf_counter()
        try:
            async with session.request(request.method, request.url, data=request.body,
                                       headers=request.headers) as resp:
                ttft_ms: float | None = None
                if request.stream:
                    chunks: list[bytes] = []
                    async for chunk in resp.content.iter_any():
                        if ttft_ms is None:
                            ttft_ms = (time.perf_counter() - started) * 1000.0
                        chunks.append(chunk)
                    body = b"".join(chunks)
                else:
                    body = await resp.read()
                # aiohttp's header mapping is case-insensitive: no copy needed.
                return HttpResponse(resp.status, resp.headers, body, ttft_ms)
        except TimeoutError as exc:
            raise TransportError(f"no complete answer within {self._timeout.total:g} s") from exc
        except aiohttp.ClientPayloadError as exc:
            if request.stream:   # the server was reached and began to answer
                raise StreamCut(f"stream cut mid-way: {type(exc).__name__}") from exc
            raise TransportError(f"answer cut mid-way: {type(exc).__name__}") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise TransportError("server closed the connection without answering") from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportError(f"cannot connect to {exc.host}:{exc.port}: {exc.os_error}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        except asyncio.IncompleteReadError as exc:
            raise TransportError("answer cut mid-way") from exc
