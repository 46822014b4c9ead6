"""A plain HTTP/1.1 client for ``http://`` servers, with :class:`batcher.pool.Transport`'s contract.

Why: against a server next door (vLLM, SGLang, a gateway on the LAN) the client's own CPU per
request bounds the rate. aiohttp's request machinery spends 110-240 us of CPU per request on
this machine (headers merged three times, a writer task, a timeout object, payload objects);
this client writes one prepared byte string and hands what arrives to httptools' response
parser (llhttp, the C parser under Node.js, as uvicorn uses it; 6-7 us an answer with its
callbacks here), about 25-30 us in all. Measured with a bare loop of 20,000 POSTs at 128 in
flight against nginx, client on one core: aiohttp 191-240 us, this protocol 22-31 us
(issue 14).

What it speaks, all that an OpenAI-style API needs over plain HTTP:

- requests: the method, the path, ``Host``, the caller's headers, ``Accept``,
  ``Accept-Encoding: gzip, deflate``, ``User-Agent: batcher`` and a ``Content-Length`` body;
- answers framed by ``Content-Length``, by chunked transfer coding (trailers read and
  dropped), or by the connection's end (llhttp has no call for that end: the exchange is
  finished here when the connection ends); no body after ``HEAD``, ``204`` or ``304``;
  ``1xx`` interim answers skipped; gzip and deflate content codings decoded;
- keep-alive connections (at most ``concurrency`` open), reused last-in first-out, never
  after ``Connection: close``, an HTTP/1.0 answer without keep-alive, or anything odd.

Anything else goes to aiohttp (:class:`batcher.pool.Transport`, made on first need): ``https://``
URLs, URLs with credentials or a path that needs quoting, and a request answered with a
redirect (aiohttp follows it). Errors are aiohttp's:
:class:`~batcher.errors.TransportError` for a refused, reset or timed-out exchange and for an
answer that is not HTTP (by llhttp's strict rules: also bare LF line ends, which aiohttp
lets pass, ``Content-Length`` beside ``Transfer-Encoding``, which it refuses too, and an
unasked-for ``101`` switch, which it returns as an answer),
:class:`~batcher.errors.StreamCut` for a stream cut mid-way.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import httptools

from batcher.errors import StreamCut, TransportError
from batcher.types import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from batcher.pool import Transport

MAX_HEAD = 64 * 1024
"""Bytes received before the status line and headers are complete: beyond, the answer is refused."""
REDIRECTS = frozenset({301, 302, 303, 307, 308})
SWEEP_EVERY = 0.05
"""Seconds between looks for exchanges past their deadline: one timer for all of them rather
than one per request (a timer per request was 5-8% of the event loop's time against a fast
server); a timeout fires at most this much late."""

# Where one exchange stands: its head awaited, a body framed by length or chunks, a body
# framed by the connection's end, or no exchange (what arrives then is out of step).
_HEAD, _BODY, _UNTIL_EOF, _DONE = range(4)


class _Target:
    """What every request to one URL shares: where to connect and its request head."""

    __slots__ = ("head", "headers", "host", "key", "plain", "port")

    def __init__(self, url: str, method: str, headers: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.key = f"{self.host}:{self.port}"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host = f"[{self.host}]" if ":" in self.host else self.host   # an IPv6 address
        if parts.port not in (None, 80):
            host = f"{host}:{self.port}"
        # aiohttp's: its automatic headers unless the caller gives them, then the caller's.
        fields = {"host": ("Host", host), "accept": ("Accept", "*/*"),
                  "accept-encoding": ("Accept-Encoding", "gzip, deflate"),
                  "user-agent": ("User-Agent", "batcher")}
        for name, value in headers.items():
            if any(c in name or c in value for c in "\r\n"):
                raise TransportError(f"header {name!r} holds a line break: not sent")
            if name.lower() != "content-length":
                fields[name.lower()] = (name, value)
        lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}"
                                                  for name, value in fields.values())]
        self.headers = headers
        self.head = ("\r\n".join(lines) + "\r\n").encode()   # as aiohttp does
        # A path that would need quoting, or credentials in the URL, go to aiohttp, which
        # quotes the one and sends the other as Basic auth, as it always did.
        self.plain = (path.isascii() and not any(c in path for c in " \t\r\n")
                      and parts.username is None and parts.password is None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time (no pipelining).

    The answer is parsed by httptools (llhttp), whose callbacks below fill the exchange in.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._state = _DONE
        self._stream = False
        self._started = 0.0
        self._received = 0
        """Bytes received since the exchange began, counted while its head is awaited."""
        self._chunked = False
        self._length = False
        self._coded = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.ttft_ms: float | None = None
        self._method_head = False

    # -- the exchange ---------------------------------------------------------------------

    def begin(self, waiter: asyncio.Future[None], stream: bool, started: float,
              head_only: bool) -> None:
        self._waiter = waiter
        self._state = _HEAD
        self._stream = stream
        self._started = started
        self._method_head = head_only
        self._received = 0
        self._chunked = self._length = self._coded = False
        self.status = 0
        self.headers = {}
        self.chunks = []
        self.ttft_ms = None

    def expire(self) -> None:
        """The exchange's time is up: fail it and drop the connection."""
        self._fail(TimeoutError())

    def abandon(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)   # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._state == _DONE:   # bytes nobody asked for: not a connection to reuse
            self.abandon()
            return
        if self._state == _HEAD:
            self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"not an HTTP answer: {exc}"))
            return
        except httptools.HttpParserUpgrade:   # 101 with Upgrade: nothing this client asks for
            self._fail(TransportError("not an HTTP answer: a switch to another protocol "
                                      "(101), not asked for"))
            return
        if self._state == _HEAD and self._received > MAX_HEAD:
            self._fail(TransportError("not an HTTP answer: headers too long"))

    def eof_received(self) -> bool:
        self.reusable = False
        if self._state == _UNTIL_EOF:
            self._finish()
        return False   # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._state == _UNTIL_EOF:
            self._finish()
        elif self._state == _HEAD and not self._received:
            self._fail(TransportError("server closed the connection without answering"))
        elif self._state != _DONE:
            what = "stream cut mid-way" if self._stream else "answer cut mid-way"
            self._fail(StreamCut(f"{what}: connection closed") if self._stream
                       else TransportError(f"{what}: connection closed"))

    # -- httptools' callbacks (llhttp frames the answer; these keep what it finds) ---------

    def on_message_begin(self) -> None:
        if self._state == _DONE:   # a second answer behind the first: out of step
            self.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state != _HEAD:   # trailers after a chunked body are not headers
            return
        key = name.decode("latin-1").lower()
        self.headers.setdefault(key, value.decode("latin-1").strip())
        if key == "transfer-encoding":   # llhttp's rule: chunked only when it is the last
            self._coded = True
            self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif key == "content-length":
            self._length = True

    def on_headers_complete(self) -> None:
        if self._state != _HEAD:
            return
        status = self._parser.get_status_code()
        if status < 200:    # an interim answer (100 Continue): the real one follows
            self.headers = {}
            self._chunked = self._length = self._coded = False
            return
        self.status = status
        if not self._parser.should_keep_alive():   # Connection: close, HTTP/1.0, EOF-framed
            self.reusable = False
        if self._method_head:
            # llhttp is not told the request was HEAD, so it would wait for the body the
            # head announces: the answer ends here, and the next one gets a fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            self._finish()
        elif status in (204, 304) or self._chunked or (self._length and not self._coded):
            self._state = _BODY
        else:
            # Framed by the connection's end: llhttp has no call for that end, so the
            # exchange is finished here when the connection ends (eof_received, connection_lost).
            self.reusable = False
            self._state = _UNTIL_EOF

    def on_body(self, data: bytes) -> None:
        if self._state == _DONE:
            self.reusable = False
            return
        if self.ttft_ms is None and self._stream:
            self.ttft_ms = (time.perf_counter() - self._started) * 1000.0
        self.chunks.append(data)

    def on_message_complete(self) -> None:
        if self._state in (_BODY, _UNTIL_EOF):   # not an interim answer's end
            self._finish()

    # -- the end of an exchange -----------------------------------------------------------

    def _finish(self) -> None:
        self._state = _DONE
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._state = _DONE
        self.reusable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class PlainTransport:
    """Sends :class:`HttpRequest` values over plain HTTP/1.1; see the module docstring.

    The contract is :class:`batcher.pool.Transport`'s: ``send`` returns a response (any
    status) or raises :class:`TransportError` (timeouts of ``timeout`` seconds for the whole
    exchange, connect included; refused or reset connections; cut or malformed answers;
    :class:`StreamCut` for a stream cut mid-way). It never retries. At most ``concurrency``
    connections are open; the throttle keeps the requests in flight within it anyway.
    """

    def __init__(self, *, concurrency: int, timeout: float) -> None:
        self._concurrency = concurrency
        self._timeout = timeout
        self._targets: dict[tuple[str, str], _Target] = {}
        self._idle: dict[str, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._other: Transport | None = None
        self._entered = False
        self._deadlines: dict[_Connection, float] = {}
        """The connections exchanging now, and when their exchange times out."""
        self._sweeper: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> PlainTransport:
        self._entered = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._entered = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.abandon()
        self._open.clear()
        self._idle.clear()
        if self._other is not None:
            other, self._other = self._other, None
            await other.__aexit__(exc_type, exc, tb)

    async def send(self, request: HttpRequest) -> HttpResponse:
        if not self._entered:
            raise RuntimeError("Transport used outside 'async with'")
        target = self._target(request) if request.url.startswith("http://") else None
        if target is None or not target.plain:
            return await (await self._aiohttp()).send(request)
        async with self._slots:
            response = await self._exchange(target, request)
        if response.status in REDIRECTS and "location" in response.headers:
            return await (await self._aiohttp()).send(request)   # aiohttp follows redirects
        return response

    async def _exchange(self, target: _Target, request: HttpRequest) -> HttpResponse:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + self._timeout
        conn = await self._connection(target, deadline)
        waiter: asyncio.Future[None] = loop.create_future()
        conn.begin(waiter, request.stream, started, request.method == "HEAD")
        body = request.body
        assert conn.transport is not None
        if body or request.method not in ("GET", "HEAD", "DELETE"):
            conn.transport.write(target.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        else:
            conn.transport.write(target.head + b"\r\n")
        self._deadlines[conn] = deadline
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep)
        try:
            await waiter
        except TimeoutError:
            raise TransportError(f"no complete answer within {self._timeout:g} s") from None
        except BaseException:
            conn.abandon()       # cancelled mid-exchange: the answer would come out of step
            raise
        finally:
            del self._deadlines[conn]
            if not conn.reusable or conn.closed:
                self._open.discard(conn)
        if conn.reusable and not conn.closed:
            self._idle.setdefault(target.key, []).append(conn)
        else:
            conn.abandon()
        data = b"".join(conn.chunks) if len(conn.chunks) != 1 else conn.chunks[0]
        encoding = conn.headers.get("content-encoding", "").lower()
        if data and encoding in ("gzip", "x-gzip", "deflate"):
            data = _decoded(data, encoding, request.stream)
        return HttpResponse(conn.status, conn.headers, data, conn.ttft_ms)

    def _sweep(self) -> None:
        """Fail the exchanges past their deadline; look again while any is running."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c, deadline in self._deadlines.items() if deadline <= now]:
            conn.expire()
        self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep) if self._deadlines else None

    async def _connection(self, target: _Target, deadline: float) -> _Connection:
        """An idle connection to the target, else a new one (connect within the deadline)."""
        idle = self._idle.get(target.key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.reusable:
                return conn
            self._open.discard(conn)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + 30.0)):
                _, conn = await loop.create_connection(_Connection, target.host, target.port)
        except TimeoutError:
            raise TransportError(f"no complete answer within {self._timeout:g} s") from None
        except OSError as exc:
            raise TransportError(f"cannot connect to {target.key}: {exc}") from exc
        self._open.add(conn)
        return conn

    def _target(self, request: HttpRequest) -> _Target:
        key = (request.method, request.url)
        target = self._targets.get(key)
        if target is None or target.headers is not request.headers:
            target = _Target(request.url, request.method, request.headers)
            self._targets[key] = target
        return target

    async def _aiohttp(self) -> Transport:
        """The aiohttp transport, for what this one does not speak (made on first need)."""
        if self._other is None:
            from batcher.pool import Transport

            other = Transport(concurrency=self._concurrency, timeout=self._timeout)
            self._other = await other.__aenter__()
        return self._other


def _decoded(data: bytes, encoding: str, stream: bool) -> bytes:
    try:
        if encoding == "deflate":
            try:
                return zlib.decompress(data)
            except zlib.error:
                return zlib.decompress(data, -zlib.MAX_WBITS)   # raw deflate, as some send
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    except zlib.error as exc:
        what = "stream cut mid-way" if stream else "answer cut mid-way"
        raise (StreamCut if stream else TransportError)(f"{what}: {encoding} body "
                                                        f"does not decode ({exc})") from None
