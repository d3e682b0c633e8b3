"""Redaction: patterns an operator does not want stored (card numbers, other people's keys,
e-mail addresses) replaced in message content before it is written; or, with
``MES_CAPTURE_CONTENT=false``, no content stored at all (``without_content``).

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

from capture.chain import canonical
from capture.message_rows import stored_message
from capture.rows import Row, RowSet

MASK = "[REDACTED]"
KEPT_KEYS = frozenset({"role", "id", "tool_call_id", "call_id", "type"})


# What a message keeps when its content goes: who said it, and the shape of its tool calls
# (ids and function names, which the admin API filters on), not what was said. A Responses
# item keeps its type, and a call or its output the call's id.
_STRUCTURE_KEYS = ("role", "type", "name", "tool_call_id", "call_id")


def without_content(row: Row) -> Row:
    """A ``messages`` row with its content dropped: content, refusal, audio and tool-call
    arguments are gone; role, name, tool call ids and function names stay. The hash stays
    that of the message as sent, so later requests still find their conversation."""
    if row.get("content_dropped"):
        return row
    message = stored_message(row)
    if not isinstance(message, dict):  # a Responses item may be any JSON: none of it kept
        message = {}
    kept: dict[str, Any] = {k: message[k] for k in _STRUCTURE_KEYS if k in message}
    kept["content"] = None
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        kept["tool_calls"] = [_call_shape(call) for call in calls if isinstance(call, dict)]
    row["body"] = canonical(kept).decode()
    row["content_text"] = None
    row["content_in_text"] = False
    row["content_dropped"] = True
    return row


def _call_shape(call: dict[str, Any]) -> dict[str, Any]:
    shape: dict[str, Any] = {k: call[k] for k in ("id", "type") if k in call}
    function = call.get("function")
    if isinstance(function, dict):
        shape["function"] = {"name": function.get("name"), "arguments": ""}
    return shape


class Redactor:
    def __init__(self, patterns: Sequence[str], *, capture_content: bool = True) -> None:
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self.capture_content = capture_content

    def text(self, value: str) -> str:
        return value if self.pattern is None else self.pattern.sub(MASK, value)

    def rows(self, rowset: RowSet) -> RowSet:
        if not self.capture_content:
            return _metadata_only(rowset)
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


def _metadata_only(rowset: RowSet) -> RowSet:
    for row in rowset.messages:
        without_content(row)
    if rowset.conversation is not None:
        rowset.conversation["title"] = None
    if rowset.completion is not None:
        rowset.completion["extra_choices"] = None
        params = rowset.completion.get("params")
        if params and _SAID_IN_PARAMS.intersection(decoded := orjson.loads(params)):
            for name in ("prediction", "instructions", "suffix"):
                decoded.pop(name, None)
            prompt = decoded.get("prompt")
            if isinstance(prompt, dict):  # a template: its id and version stay
                prompt.pop("variables", None)
            elif prompt is not None:  # a legacy prompt the record could not take as messages
                del decoded["prompt"]
            rowset.completion["params"] = orjson.dumps(decoded).decode()
    return rowset


# Request fields, beside the messages, that hold what was said: chat's predicted output
# (the answer's text, in advance), a Responses call's instructions (its system prompt) and
# the values it fills into a prompt template, a legacy completion's suffix and prompt.
_SAID_IN_PARAMS = frozenset({"prediction", "instructions", "suffix", "prompt"})
