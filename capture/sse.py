"""Server-sent events, split and parsed from raw bytes. Pure functions, no I/O.

The relay forwards upstream bytes as they arrive; these only look at them. ``EventSplitter``
cuts a byte stream into whole events (keeping their exact bytes, terminator included), so
that the relay can hold back a single event without touching the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_TERMINATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class EventSplitter:
    """Feeds on raw chunks, yields complete events byte for byte."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events = []
        start = 0
        while True:
            end = _event_end(buffer, start)
            if end < 0:
                break
            events.append(buffer[start:end])
            start = end
        self._buffer = buffer[start:]
        return events

    def rest(self) -> bytes:
        """Bytes of an event whose end has not arrived (a stream cut short)."""
        return self._buffer


def _event_end(buffer: bytes, start: int) -> int:
    best = -1
    for terminator in _TERMINATORS:
        found = buffer.find(terminator, start)
        if found >= 0 and (best < 0 or found + len(terminator) < best):
            best = found + len(terminator)
    return best


def event_data(event: bytes) -> bytes | None:
    """The ``data`` of one event (its data lines joined by newlines), or None if it has none."""
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    data = [line[5:].removeprefix(b" ") if line.startswith(b"data:") else None for line in lines]
    parts = [part for part in data if part is not None]
    if not parts:
        return None
    return b"\n".join(parts)


def iter_data(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Every event's data in a whole stream, in order; a trailing unterminated event counts."""
    splitter = EventSplitter()
    for chunk in chunks:
        for event in splitter.feed(chunk):
            data = event_data(event)
            if data is not None:
                yield data
    tail = splitter.rest()
    if tail.strip():
        data = event_data(tail)
        if data is not None:
            yield data
