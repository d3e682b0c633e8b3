"""A captured record as one line of the spool, and back: its JSON journal, named by kind."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from capture.exchange import Exchange, RequestLog
from capture.redaction import Redactor
from capture.registry import RECORD_KINDS
from capture.rows import Record
from capture.shaped import Shaped


def to_entry(record: Record) -> bytes:
    """A captured record as one line of the spool."""
    assert isinstance(record, (Exchange, RequestLog, Shaped))
    try:
        return orjson.dumps(record.journal())
    except orjson.JSONEncodeError:
        if isinstance(record, Shaped):
            return orjson.dumps(record.journal(fitted=True))
        raise


def shaped_entry(redactor: Redactor) -> Callable[[Record], bytes]:
    """``to_entry`` for a gateway that redacts: each record spooled as its redacted rows."""

    def encode(record: Record) -> bytes:
        return to_entry(Shaped.of(record, redactor))

    return encode


def from_entry(entry: bytes) -> Record:
    """A spooled record back as the record it was."""
    data = orjson.loads(entry)
    kind = RECORD_KINDS.get(data.get("kind"))
    if kind is None:
        raise ValueError(f"unknown record kind {data.get('kind')!r}")
    record = kind.from_journal(data)
    if isinstance(record, Exchange):
        # JSON writes a NUL in any string as \u0000, and a response body's bytes are kept
        # as text: an entry without those six characters has no NUL anywhere in it.
        record.nul_free = b"\\u0000" not in entry
    return record
