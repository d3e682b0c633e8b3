"""The rows one captured record becomes, and what the writer needs of a queued record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

Row = dict[str, Any]


@dataclass(slots=True)
class RowSet:
    completion: Row | None = None
    conversation: Row | None = None
    messages: list[Row] = field(default_factory=list)
    request_log: Row | None = None
    # How many of ``messages``, from the first, the request resent: its history up to its
    # last assistant message, stored already as a rule (by the turn that answered it).
    resent: int = 0
    # Known to hold no NUL character: the writer need not look. Not part of the rows.
    nul_free: bool = field(default=False, compare=False)


class Record(Protocol):
    """Anything the capture queue carries: it has an id and knows its rows."""

    id: str

    def rows(self) -> RowSet: ...
