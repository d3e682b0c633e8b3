"""The rows one captured record becomes, each named by the table it goes to, and what the
writer needs of a record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from capture.chain import link

Row = dict[str, Any]

# The history tables records write to. A record kind with a table of its own names it in
# its rows; the writer stores rows of any table it does not know more of as records, once
# per id (see ``storage/batch.py``).
COMPLETIONS = "completions"
CONVERSATIONS = "conversations"
MESSAGES = "messages"
REQUEST_LOGS = "request_logs"


@dataclass(slots=True)
class RowSet:
    """The rows of one record, by table."""

    tables: dict[str, list[Row]] = field(default_factory=dict)
    # How many of the ``messages`` rows, from the first, the request resent: its history up
    # to its last assistant message, stored already as a rule (by the turn that answered).
    resent: int = 0
    # Known to hold no NUL character: the writer need not look. Not part of the rows.
    nul_free: bool = field(default=False, compare=False)
    # The upstream's id of the answer this record follows up (a Responses request's
    # ``previous_response_id``), in the record owner's history: the writer moves the rows
    # into that answer's conversation, after its last message (``moved``).
    follows: str | None = None
    # Redaction and ``MES_CAPTURE_CONTENT=false`` were applied (``capture/redaction.py``).
    redacted: bool = field(default=False, compare=False)

    def owners(self) -> set[str]:
        """Whose rows these are (one owner, as a rule)."""
        return {row["owner"] for rows in self.tables.values() for row in rows if "owner" in row}

    def moved(self, conversation_id: str, parent_hash: str) -> RowSet:
        """These rows in another conversation, their message chain hung under
        ``parent_hash``. A message's new hash is its old one linked to its new parent, as
        ``capture.chain`` links content: the chain stays one, and nothing is re-read."""
        renamed: dict[str, str] = {}
        tables: dict[str, list[Row]] = {}
        for name, rows in self.tables.items():
            moved = []
            for row in rows:
                row = {**row}
                if name == MESSAGES:
                    parent = renamed.get(row["parent_hash"] or "", parent_hash)
                    renamed[row["hash"]] = link(parent, row["hash"].encode())
                    row["hash"], row["parent_hash"] = renamed[row["hash"]], parent or None
                if name == CONVERSATIONS:
                    row["id"] = conversation_id
                elif "conversation_id" in row:
                    row["conversation_id"] = conversation_id
                moved.append(row)
            tables[name] = moved
        for row in tables.get(COMPLETIONS, ()):
            for column in ("request_hash", "response_hash"):
                if row.get(column):
                    row[column] = renamed.get(row[column], row[column])
            # A request that sent nothing new ends where it was hung: its answer begins there.
            row["request_hash"] = row.get("request_hash") or parent_hash or None
        return RowSet(tables, resent=0, nul_free=self.nul_free)

    def one(self, table: str) -> Row | None:
        rows = self.tables.get(table)
        return rows[0] if rows else None

    @property
    def completion(self) -> Row | None:
        return self.one(COMPLETIONS)

    @property
    def conversation(self) -> Row | None:
        return self.one(CONVERSATIONS)

    @property
    def messages(self) -> list[Row]:
        return self.tables.get(MESSAGES, [])


class Record(Protocol):
    """Anything the capture queue carries: it has an id and knows its rows."""

    id: str

    def rows(self) -> RowSet: ...


def short(value: Any, length: int) -> str | None:
    """``value`` as text (JSON if it is not a string), cut to a column's ``length``."""
    if value is None:
        return None
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text[:length]


def integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def json_or_none(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def dig(mapping: Any, *path: str) -> Any:
    """``mapping[a][b]...``, or None where a step is not a dict."""
    value: Any = mapping
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
