"""Redaction: patterns an operator does not want stored (card numbers, other people's keys,
e-mail addresses) replaced by ``[REDACTED]`` in every text a record stores; or, with
``MES_CAPTURE_CONTENT=false``, no content stored at all (``without_content``).

Applied to a record's rows. Where either is set, the gateway applies it before the record
reaches its spool (``shaped.py``): what is on disk, written, dead-lettered or logged is
already redacted. Every text column is covered, of every kind of record (messages, every
choice, parameters, metadata, error messages, titles, the search text, request-log paths),
but for the columns that name rather than say (ids, hashes, models, roles, finish reasons,
error types, upstream names). Hashes are of the content as sent, so a conversation is still
recognised and stored once, and what is rebuilt is the redacted text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from capture.chain import canonical
from capture.message_rows import stored_message
from capture.rows import MESSAGES, REQUEST_LOGS, Row, RowSet

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

    @property
    def active(self) -> bool:
        """Whether it changes anything: a pattern to look for, or content not kept."""
        return self.pattern is not None or not self.capture_content

    def text(self, value: str) -> str:
        return value if self.pattern is None else self.pattern.sub(MASK, value)

    def rows(self, rowset: RowSet) -> RowSet:
        """``rowset`` as it may be stored (changed in place), once: rows already redacted,
        by the gateway before they were spooled, are left as they are."""
        if rowset.redacted or not self.active:
            return rowset
        if not self.capture_content:
            _metadata_only(rowset)
        if self.pattern is not None:
            for name, rows in rowset.tables.items():
                for row in rows:
                    self._row(row, name)
        rowset.redacted = True
        return rowset

    def _row(self, row: Row, table: str) -> None:
        for column, value in row.items():
            if not isinstance(value, str) or column in _NAMING:
                continue
            body = table == MESSAGES and column == "body"
            if body or column in _JSON_COLUMNS:
                try:
                    decoded = orjson.loads(value)
                except orjson.JSONDecodeError:  # a column holding text after all
                    row[column] = self.text(value)
                    continue
                # A message's body stays in its canonical form (sorted keys).
                option = orjson.OPT_SORT_KEYS if body else 0
                row[column] = orjson.dumps(self._json(decoded), option=option).decode()
            else:
                row[column] = self.text(value)

    def _json(self, value: Any, key: str | None = None) -> Any:
        if isinstance(value, str):
            return value if key in KEPT_KEYS else self.text(value)
        if isinstance(value, list):
            return [self._json(item) for item in value]
        if isinstance(value, dict):
            return {k: self._json(v, k) for k, v in value.items()}
        return value


# Columns that name something rather than say it: ids and hashes, who (the owner, the key's
# fingerprint), which model, role, kind, upstream, how a call ended, when. Every other text
# column of every table is redacted.
_NAMING = frozenset(
    {
        "id",
        "response_id",
        "conversation_id",
        "owner",
        "key_fingerprint",
        "hash",
        "parent_hash",
        "request_hash",
        "response_hash",
        "role",
        "call_type",
        "requested_model",
        "response_model",
        "system_fingerprint",
        "finish_reason",
        "error_type",
        "client_ip",
        "method",
        "upstream",
        "attempts",
        "usage",
        "price_version",
    }
)
# Text columns that hold JSON (as messages' bodies do): their strings are redacted, and they
# stay JSON.
_JSON_COLUMNS = frozenset({"params", "metadata", "extra_choices", "tags"})


def _metadata_only(rowset: RowSet) -> None:
    for row in rowset.messages:
        without_content(row)
    if rowset.conversation is not None:
        rowset.conversation["title"] = None
    if rowset.completion is not None:
        rowset.completion["extra_choices"] = None
        # An upstream's error may quote what it was sent; its type says what went wrong.
        rowset.completion["error_message"] = None
        params = rowset.completion.get("params")
        if params:
            rowset.completion["params"] = orjson.dumps(_unsaid(orjson.loads(params))).decode()
    for row in rowset.tables.get(REQUEST_LOGS, ()):
        row["path"] = row["path"].partition("?")[0]  # the query may carry what was asked


def _unsaid(params: Any) -> Any:
    """A request's parameters without what was said in them: chat's predicted output (the
    answer's text, in advance), a Responses call's instructions (its system prompt) and the
    values it fills into a prompt template, a legacy completion's suffix and prompt, and
    the descriptions of tools and schemas."""
    if not isinstance(params, dict):
        return params
    for name in ("prediction", "instructions", "suffix"):
        params.pop(name, None)
    prompt = params.get("prompt")
    if isinstance(prompt, dict):  # a template: its id and version stay
        prompt.pop("variables", None)
    elif prompt is not None:  # a legacy prompt the record could not take as messages
        del params["prompt"]
    return _undescribed(params)


def _undescribed(value: Any) -> Any:
    """``value`` without the descriptions in it: those of tools, of their parameters, of a
    response format's schema, which are prompts as much as a system message is. Names and
    types stay."""
    if isinstance(value, dict):
        return {k: _undescribed(v) for k, v in value.items() if k != "description"}
    if isinstance(value, list):
        return [_undescribed(item) for item in value]
    return value
