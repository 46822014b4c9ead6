"""Tests of the incremental text/event-stream parser."""

from __future__ import annotations

import pytest

from batcher.providers.sse import SseEvent, SseParser, parse_sse

STREAM = (
    b": a comment line\n"
    b"event: message_start\n"
    b"data: {\"a\": 1}\n"
    b"\n"
    b"data: line one\n"
    b"data: line two\n"
    b"id: 42\n"
    b"retry: 1000\n"
    b"\n"
    b"data:no-space\n"
    b"data:  two-spaces\n"
    b"\n"
    b"event: ping\n"
    b"\n"
    b"data\n"
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)

EXPECTED = [
    SseEvent("message_start", '{"a": 1}'),
    SseEvent("message", "line one\nline two", "42"),
    SseEvent("message", "no-space\n two-spaces"),
    SseEvent("message", ""),
    SseEvent("message", "[DONE]"),
]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_whole_stream_each_line_ending(eol: bytes) -> None:
    events, clean = parse_sse(STREAM.replace(b"\n", eol))
    assert events == EXPECTED
    assert clean


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
def test_any_chunking_gives_the_same_events(eol: bytes, size: int) -> None:
    body = STREAM.replace(b"\n", eol)
    parser = SseParser()
    events: list[SseEvent] = []
    for start in range(0, len(body), size):
        events.extend(parser.feed(body[start:start + size]))
    tail, clean = parser.close()
    assert events + tail == EXPECTED
    assert clean


def test_events_arrive_as_soon_as_complete() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == [SseEvent("message", "a")]
    assert parser.feed(b"data: b\r") == []
    # "\r" may be the first half of "\r\n": the next chunk decides
    assert parser.feed(b"\n\r\n") == [SseEvent("message", "b")]


def test_final_event_without_blank_line_is_returned_but_unclean() -> None:
    events, clean = parse_sse(b"data: a\n\ndata: b")
    assert events == [SseEvent("message", "a"), SseEvent("message", "b")]
    assert not clean
    events, clean = parse_sse(b"data: a\n\ndata: b\n")
    assert events == [SseEvent("message", "a"), SseEvent("message", "b")]
    assert not clean


def test_trailing_cr_counts_as_a_line_end() -> None:
    events, clean = parse_sse(b"data: a\r\r")
    assert events == [SseEvent("message", "a")]
    assert clean


def test_empty_and_comment_only_streams_are_clean() -> None:
    assert parse_sse(b"") == ([], True)
    assert parse_sse(b": ping\n\n: ping\n") == ([], True)


def test_utf8_split_across_chunks() -> None:
    body = "data: 你好\n\n".encode()
    parser = SseParser()
    events = [e for i in range(len(body)) for e in parser.feed(body[i:i + 1])]
    assert events == [SseEvent("message", "你好")]


def test_feed_after_close_is_refused() -> None:
    parser = SseParser()
    parser.close()
    with pytest.raises(ValueError):
        parser.feed(b"data: x\n\n")


def test_leading_bom_is_dropped() -> None:
    events, _ = parse_sse(b"\xef\xbb\xbfdata: x\n\n")
    assert events == [SseEvent("message", "x")]
    events, _ = parse_sse(b"\xef\xbb\xbf: comment\ndata: y\n\n")
    assert events == [SseEvent("message", "y")]
