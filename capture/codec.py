"""A captured record as one line of the spool, and back: its JSON journal, named by kind."""

from __future__ import annotations

import orjson

from capture.exchange import Exchange, RequestLog
from capture.registry import RECORD_KINDS
from capture.rows import Record


def to_entry(record: Record) -> bytes:
    """A captured record as one line of the spool."""
    assert isinstance(record, (Exchange, RequestLog))
    return orjson.dumps(record.journal())


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
