"""Redaction: patterns an operator does not want stored (card numbers, other people's keys,
e-mail addresses) replaced in message content before it is written.

Applied by the writer to the rows it is about to write, so the request path pays nothing;
the spool on local disk holds records as they came until they are written. Only message
content is redacted (every string in a message's JSON, the role and ids excepted), and the
conversation title made from it; hashes are of the content as sent, so a conversation is
still recognised and stored once, and what is rebuilt is the redacted text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from storage.rows import RowSet

MASK = "[REDACTED]"
KEPT_KEYS = frozenset({"role", "id", "tool_call_id", "type"})


class Redactor:
    def __init__(self, patterns: Sequence[str]) -> None:
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def text(self, value: str) -> str:
        return value if self.pattern is None else self.pattern.sub(MASK, value)

    def rows(self, rowset: RowSet) -> RowSet:
        if self.pattern is None:
            return rowset
        for row in rowset.messages:
            row["body"] = orjson.dumps(
                self._json(orjson.loads(row["body"])), option=orjson.OPT_SORT_KEYS
            ).decode()
            if row["content_text"] is not None:
                row["content_text"] = self.text(row["content_text"])
        if rowset.conversation is not None and rowset.conversation.get("title"):
            rowset.conversation["title"] = self.text(rowset.conversation["title"])
        return rowset

    def _json(self, value: Any, key: str | None = None) -> Any:
        if isinstance(value, str):
            return value if key in KEPT_KEYS else self.text(value)
        if isinstance(value, list):
            return [self._json(item) for item in value]
        if isinstance(value, dict):
            return {k: self._json(v, k) for k, v in value.items()}
        return value
