"""A record spooled as its rows, already redacted: how records travel when redaction
patterns are set or ``MES_CAPTURE_CONTENT=false``, so that what the spool holds on disk
(and what is dead-lettered from it) is what the database may hold, never more.

Shaping a record costs its process what the writer otherwise spends on it (its rows,
hashes and redaction), so the gateway pays it only where an operator asked for it; by
default records go to the spool as they came, and the writer shapes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from capture.redaction import Redactor
from capture.rows import Record, RowSet

# The columns of the history tables that hold a time; JSON has them as ISO text.
_TIMES = ("started_at", "created_at", "updated_at")
_LARGEST = 2**63 - 1


@dataclass(slots=True)
class Shaped:
    kind: ClassVar[str] = "shaped"

    id: str
    rowset: RowSet

    @classmethod
    def of(cls, record: Record, redactor: Redactor) -> Shaped:
        return cls(record.id, redactor.rows(record.rows()))

    def rows(self) -> RowSet:
        return self.rowset

    def journal(self, *, fitted: bool = False) -> dict[str, Any]:
        """As JSON; ``fitted``, with what JSON cannot hold left out (see ``_fits``)."""
        rowset = self.rowset
        tables = rowset.tables
        if fitted:
            tables = {name: [_fits(row) for row in rows] for name, rows in tables.items()}
        return {
            "kind": self.kind,
            "id": self.id,
            "tables": tables,
            "resent": rowset.resent,
            "follows": rowset.follows,
        }

    @classmethod
    def from_journal(cls, entry: dict[str, Any]) -> Shaped:
        tables = entry["tables"]
        for rows in tables.values():
            for row in rows:
                for column in _TIMES:
                    if isinstance(row.get(column), str):
                        row[column] = datetime.fromisoformat(row[column])
        rowset = RowSet(tables, resent=entry["resent"], follows=entry["follows"], redacted=True)
        return cls(entry["id"], rowset)


def _fits(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as JSON can hold it: an integer past 64 bits (a hostile upstream's token
    count), which no column holds either, is none."""
    return {
        k: None if isinstance(v, int) and not -_LARGEST - 1 <= v <= _LARGEST else v
        for k, v in row.items()
    }
