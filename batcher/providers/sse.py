"""A pure, incremental parser of ``text/event-stream`` bytes into (event, data) pairs."""

from __future__ import annotations

import re
from dataclasses import dataclass

_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched server-sent event.

    ``event`` is the ``event:`` field, ``"message"`` when the server gave none (as in the
    WHATWG spec). ``data`` is the ``data:`` lines joined with ``"\\n"``. ``id`` is the last
    ``id:`` field seen in this event, or None.
    """

    event: str
    data: str
    id: str | None = None


class SseParser:
    """Feed bytes in any chunking; get events as they complete.

    Lines may end in ``\\n``, ``\\r\\n`` or ``\\r`` (a ``\\r`` at the end of a chunk waits for
    the next chunk, which may begin with its ``\\n``). Lines starting with ``:`` are
    comments. A blank line dispatches the event gathered so far; an event with no ``data``
    line is dropped, as browsers do. :meth:`close` dispatches a final event that the
    server did not end with a blank line and says whether the stream ended cleanly.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None
        self._pending = False  # any field seen since the last dispatch
        self._closed = False
        self._first_line = True  # a UTF-8 BOM before the first line is dropped, per the spec

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events completed by ``chunk`` (possibly none)."""
        if self._closed:
            raise ValueError("SseParser.feed() after close()")
        self._buf += chunk
        events: list[SseEvent] = []
        buf = self._buf
        pos = 0
        for match in _EOL.finditer(buf):
            if match.end() == len(buf) and match.group() == b"\r":
                break  # may be the first half of "\r\n": wait for more bytes
            self._line(bytes(buf[pos:match.start()]), events)
            pos = match.end()
        del buf[:pos]
        return events

    def close(self) -> tuple[list[SseEvent], bool]:
        """Flush: the final events and whether the stream ended cleanly.

        Clean means the last byte ended an event with a blank line (or the stream was empty
        or held only comments); a final event without its blank line is still returned, but
        reported as unclean so callers can tell a stream that was cut off.
        """
        events: list[SseEvent] = []
        if self._buf:
            # A trailing "\r" is a complete line ending; anything else is an unfinished line.
            tail = bytes(self._buf[:-1] if self._buf.endswith(b"\r") else self._buf)
            self._buf.clear()
            self._line(tail, events)
        clean = not self._pending
        if self._pending:
            self._dispatch(events)
        self._closed = True
        return events, clean

    # -- internals -------------------------------------------------------------------

    def _line(self, raw: bytes, events: list[SseEvent]) -> None:
        if not raw:
            self._first_line = False
            self._dispatch(events)
            return
        line = raw.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        self._pending = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the spec says.

    def _dispatch(self, events: list[SseEvent]) -> None:
        if self._data:
            events.append(SseEvent(self._event or "message", "\n".join(self._data), self._id))
        self._event = None
        self._data = []
        self._id = None
        self._pending = False


def parse_sse(body: bytes) -> tuple[list[SseEvent], bool]:
    """All events of a whole stream body, and whether it ended cleanly (see SseParser.close)."""
    parser = SseParser()
    events = parser.feed(body)
    tail, clean = parser.close()
    events.extend(tail)
    return events, clean
