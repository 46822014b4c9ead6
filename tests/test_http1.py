"""The plain HTTP/1.1 transport keeps the transport contract: loopback servers that answer
by hand (every framing, every way an answer can go wrong), and the same cases run through
aiohttp's transport, so the two are held to one behaviour."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from batcher.errors import StreamCut, TransportError
from batcher.http1 import PlainTransport
from batcher.pool import Transport
from batcher.types import HttpRequest, HttpResponse

Reader, Writer = asyncio.StreamReader, asyncio.StreamWriter
Handler = Callable[["Server", Reader, Writer], Awaitable[None]]
TRANSPORTS = [PlainTransport, Transport]


class Server:
    """A loopback TCP server; ``handler`` answers each connection; requests are recorded."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Server]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def request(url: str, *, stream: bool = False, body: bytes = b'{"a": 1}',
            headers: dict[str, str] | None = None) -> HttpRequest:
    return HttpRequest("POST", url, headers if headers is not None else
                       {"Content-Type": "application/json", "Authorization": "Bearer sk-x"},
                       body, stream=stream)


def answer(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def keep_answering(*answers: bytes) -> Handler:
    """Answers the requests of a connection in turn with ``answers`` (the last repeats)."""
    async def handler(server: Server, reader: Reader, writer: Writer) -> None:
        n = 0
        while await server.read_request(reader) is not None:
            writer.write(answers[min(n, len(answers) - 1)])
            await writer.drain()
            n += 1
    return handler


async def send(kind: type[PlainTransport] | type[Transport], req: HttpRequest,
               timeout: float = 5.0) -> HttpResponse:
    async with kind(concurrency=4, timeout=timeout) as transport:
        return await transport.send(req)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_an_answer_by_content_length_and_the_request_sent(
        kind: type[PlainTransport] | type[Transport]) -> None:
    server = Server(keep_answering(answer(b'{"ok": true}', "X-Ratelimit-Remaining-Requests: 7",
                                               "Content-Type: application/json")))
    async with server.running():
        response = await send(kind, request(server.url(), body=b'{"model": "m"}'))
    assert (response.status, response.body) == (200, b'{"ok": true}')
    assert response.headers.get("x-ratelimit-remaining-requests") == "7"
    sent = server.requests[0]
    assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    lines = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip()
             for line in sent.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]}
    assert lines[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert lines[b"content-length"] == b"14" and sent.endswith(b'{"model": "m"}')
    assert lines[b"authorization"] == b"Bearer sk-x"
    assert lines[b"user-agent"] == b"batcher"
    assert b"gzip" in lines[b"accept-encoding"]


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_chunked_answers_after_an_interim_100_with_trailers(
        kind: type[PlainTransport] | type[Transport]) -> None:
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
    server = Server(keep_answering(chunked))
    async with server.running(), kind(concurrency=2, timeout=5) as transport:
        first = await transport.send(request(server.url()))
        second = await transport.send(request(server.url(), stream=True))
    assert first.body == second.body == b"hello world"
    assert second.ttft_ms is not None and second.ttft_ms >= 0
    assert server.connections == 1, "the connection is kept alive"


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_an_answer_ended_by_the_connection_and_gzip_and_deflate_bodies(
        kind: type[PlainTransport] | type[Transport]) -> None:
    async def until_close(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nthe whole body")
        await writer.drain()

    server = Server(until_close)
    zipped = Server(keep_answering(
        answer(gzip.compress(b'{"z": 1}'), "Content-Encoding: gzip"),
        answer(zlib.compress(b'{"z": 2}'), "Content-Encoding: deflate")))
    async with server.running(), zipped.running():
        assert (await send(kind, request(server.url()))).body == b"the whole body"
        async with kind(concurrency=2, timeout=5) as transport:
            assert (await transport.send(request(zipped.url()))).body == b'{"z": 1}'
            assert (await transport.send(request(zipped.url()))).body == b'{"z": 2}'


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_connection_close_is_honoured_and_a_stale_connection_is_not_an_error(
        kind: type[PlainTransport] | type[Transport]) -> None:
    async def once(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(answer(b"{}", "Connection: close"))
        await writer.drain()

    server = Server(once)
    async with server.running(), kind(concurrency=2, timeout=5) as transport:
        for _ in range(3):
            assert (await transport.send(request(server.url()))).status == 200
            await asyncio.sleep(0.05)
    assert server.connections == 3


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_server_that_closes_without_answering(
        kind: type[PlainTransport] | type[Transport]) -> None:
    async def hang_up(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)

    server = Server(hang_up)
    async with server.running():
        with pytest.raises(TransportError, match="closed the connection without answering"):
            await send(kind, request(server.url()))


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_an_answer_cut_mid_way_and_a_stream_cut_mid_way(
        kind: type[PlainTransport] | type[Transport]) -> None:
    async def cut(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async def cut_stream(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"6\r\ndata: \r\n")
        await writer.drain()

    server, streams = Server(cut), Server(cut_stream)
    async with server.running(), streams.running():
        with pytest.raises(TransportError, match="cut mid-way"):
            await send(kind, request(server.url()))
        with pytest.raises(StreamCut, match="stream cut mid-way"):
            await send(kind, request(streams.url(), stream=True))


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_garbage_is_not_an_answer(kind: type[PlainTransport] | type[Transport]) -> None:
    server = Server(keep_answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    async with server.running():
        with pytest.raises(TransportError):
            await send(kind, request(server.url()))


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_server_that_never_answers_times_out_and_a_closed_port_is_refused(
        kind: type[PlainTransport] | type[Transport]) -> None:
    async def silent(server: Server, reader: Reader, writer: Writer) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    server = Server(silent)
    async with server.running():
        with pytest.raises(TransportError, match=r"no complete answer within 0\.3 s"):
            await send(kind, request(server.url()), timeout=0.3)
        port = server.port
    with pytest.raises(TransportError, match=f"cannot connect to 127.0.0.1:{port}"):
        await send(kind, request(f"http://127.0.0.1:{port}/v1/x"))


async def test_a_cancelled_exchange_drops_its_connection_and_the_next_one_is_clean() -> None:
    """A request abandoned on the wire (a stop) must not leave its late answer to be read
    as the next request's."""
    async def slow_then_fast(server: Server, reader: Reader, writer: Writer) -> None:
        while (sent := await server.read_request(reader)) is not None:
            if b"slow" in sent:
                await asyncio.sleep(0.3)
                writer.write(answer(b"late"))
            else:
                writer.write(answer(b"fresh"))
            await writer.drain()

    server = Server(slow_then_fast)
    async with server.running(), PlainTransport(concurrency=1, timeout=5) as transport:
        task = asyncio.create_task(transport.send(request(server.url(), body=b"slow")))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await transport.send(request(server.url(), body=b"fast"))).body == b"fresh"
        await asyncio.sleep(0.4)
        assert server.open_now == 1, "the abandoned connection was closed"
        assert (await transport.send(request(server.url(), body=b"fast"))).body == b"fresh"


async def test_redirects_and_other_schemes_go_to_aiohttp(
        monkeypatch: pytest.MonkeyPatch) -> None:
    target = Server(keep_answering(answer(b"moved here")))
    async with target.running():
        moved = Server(keep_answering(answer(
            b"", f"Location: {target.url('/v1/new')}", status="307 Temporary Redirect")))
        async with moved.running():
            response = await send(PlainTransport, request(moved.url()))
        assert (response.status, response.body) == (200, b"moved here")
        assert target.requests[0].startswith(b"POST /v1/new HTTP/1.1")

    sent: list[str] = []

    async def fake_send(self: Transport, req: HttpRequest) -> HttpResponse:
        sent.append(req.url)
        return HttpResponse(200, {}, b"via aiohttp")

    monkeypatch.setattr(Transport, "send", fake_send)
    for url in ("https://api.example.com/v1/chat/completions",
                "http://user:secret@127.0.0.1:9/v1/chat/completions",
                "http://127.0.0.1:9/v1/a path"):
        response = await send(PlainTransport, request(url))
        assert response.body == b"via aiohttp" and sent[-1] == url


async def test_a_header_with_a_line_break_is_refused_not_sent() -> None:
    server = Server(keep_answering(answer(b"{}")))
    async with server.running():
        with pytest.raises(TransportError, match="line break"):
            await send(PlainTransport, request(server.url(), headers={"X-A": "1\r\nX-B: 2"}))
    assert server.requests == []


async def test_connections_are_reused_up_to_the_concurrency() -> None:
    async def slow(server: Server, reader: Reader, writer: Writer) -> None:
        while await server.read_request(reader) is not None:
            await asyncio.sleep(0.02)
            writer.write(answer(b"{}"))
            await writer.drain()

    server = Server(slow)
    async with server.running(), PlainTransport(concurrency=3, timeout=5) as transport:
        for _ in range(3):
            await asyncio.gather(*(transport.send(request(server.url())) for _ in range(10)))
    assert server.connections == 3
    assert len(server.requests) == 30


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_head_answer_has_no_body_and_the_connection_serves_the_next_request(
        kind: type[PlainTransport] | type[Transport]) -> None:
    # The parser is not told the request was HEAD: its announced length must not swallow
    # the next answer on the same connection.
    async def head_then_post(server: Server, reader: Reader, writer: Writer) -> None:
        while (sent := await server.read_request(reader)) is not None:
            if sent.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            else:
                writer.write(answer(b'{"after": "head"}'))
            await writer.drain()

    server = Server(head_then_post)
    async with server.running(), kind(concurrency=1, timeout=5) as transport:
        head = await transport.send(HttpRequest("HEAD", server.url(), {}, b""))
        assert (head.status, head.body) == (200, b"")
        response = await transport.send(request(server.url()))
    assert (response.status, response.body) == (200, b'{"after": "head"}')
    assert server.connections == 1, "the connection is kept alive"
