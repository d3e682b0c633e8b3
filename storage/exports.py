"""The export's format, both ways: a stored completion as one JSON line (what
``/admin/export`` streams and what archives hold), and such a line back as the rows a
captured record becomes, which the writer stores as it stores a capture.

A line holds the completion's columns, its request's messages and its answer rebuilt
(``storage/browse.py``), and its conversation's title, name, metadata and tags. Going
back, the messages are chained again (``capture/chain.py``): a conversation's turns share
their history's hashes as they did when captured, so it is stored once, and each
completion points at its request and answer. Hashes the capture could not have given from
the content alone (a Responses follow-up hung under the answer it follows, content
dropped by retention) come out as new ones, consistent across the lines of an import.

A request log (a proxied call that is not a captured API) is a line with ``"object":
"request_log"``; an archive's manifest line is ``{"manifest": {...}}``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.engine import RowMapping

from capture.chain import ROOT, chain
from capture.chat import is_assistant, resent_count
from capture.exchange import attempts_of
from capture.message_rows import message_row
from capture.messages import MARKS, unmarked
from capture.responses import is_output
from capture.rows import COMPLETIONS, CONVERSATIONS, MESSAGES, REQUEST_LOGS, RowSet
from storage.schema import completions, request_logs

JSON = dict[str, Any]
REQUEST_LOG = "request_log"
MANIFEST = "manifest"
# A conversation's columns a line carries (its totals are the writer's to count again).
CONVERSATION_FIELDS = ("title", "client_conversation_id", "metadata", "tags", "created_at")
_COMPLETION_COLUMNS = tuple(column.name for column in completions.columns)
_REQUEST_LOG_COLUMNS = tuple(column.name for column in request_logs.columns)
_JSON_COLUMNS = ("params", "metadata", "extra_choices", "attempts")


class BadLine(ValueError):
    """A line that is not a record of the export's format."""


def stored_json(raw: str | None) -> Any:
    """A JSON column's value (written by orjson), or None."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def completion_fields(row: RowMapping) -> JSON:
    """A completion's columns as the read APIs give them: JSON columns parsed, the owner
    also as ``user_id``, every try listed (``attempts_of``)."""
    params = stored_json(row["params"])
    if isinstance(params, dict):
        params.pop(MARKS, None)  # the request's cache markers, back in its messages
    record = {str(key): value for key, value in row.items()}
    record["user_id"] = row["owner"]
    record["params"] = params
    record["metadata"] = stored_json(row["metadata"])
    record["attempts"] = attempts_of(
        stored_json(row["attempts"]), row["upstream"], row["status_code"]
    )
    return record


def export_record(
    row: RowMapping, request: list[Any], answer: Any, conversation: RowMapping | None
) -> JSON:
    """One completion as a line of the export (and of an archive)."""
    record = {**completion_fields(row), "request": request, "answer": answer}
    record["extra_choices"] = stored_json(row["extra_choices"])
    if conversation is not None:
        record["conversation"] = {
            "title": conversation["title"],
            "client_conversation_id": conversation["client_conversation_id"],
            "metadata": stored_json(conversation["metadata"]),
            "tags": stored_json(conversation["tags"]),
            "created_at": conversation["created_at"],
        }
    return record


def request_log_record(row: RowMapping) -> JSON:
    record = {str(key): value for key, value in row.items()}
    record["object"] = REQUEST_LOG
    record["attempts"] = stored_json(row["attempts"])
    return record


def line(record: JSON) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_NAIVE_UTC) + b"\n"


# -- back ---------------------------------------------------------------------------------


def rowset_of(record: Any) -> RowSet:
    """The rows a line of the export stands for: a completion (its conversation and
    messages with it) or a request log. Raises ``BadLine`` for anything else."""
    if not isinstance(record, dict):
        raise BadLine("not a JSON object")
    try:
        if record.get("object") == REQUEST_LOG:
            return RowSet({REQUEST_LOGS: [_request_log_row(record)]})
        return _completion_rowset(record)
    except BadLine:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise BadLine(f"{type(error).__name__}: {error}") from None


def _completion_rowset(record: JSON) -> RowSet:
    row: JSON = {name: record.get(name) for name in _COMPLETION_COLUMNS}
    for name in ("id", "conversation_id", "owner", "call_type"):
        if not isinstance(row[name], str) or not row[name]:
            raise BadLine(f"{name!r} must be a non-empty string")
    if not isinstance(row["status_code"], int):
        raise BadLine("'status_code' must be an integer")
    started_at = _time(row["started_at"], "started_at")
    row["started_at"] = started_at
    kind = row["call_type"]
    sent = record.get("request")
    if not isinstance(sent, list):
        raise BadLine("'request' must be a list of messages")
    params = record.get("params")
    if kind == "messages":
        sent, marks = unmarked(sent)
        if marks and isinstance(params, dict):
            params = {**params, MARKS: marks}
    answer = record.get("answer")
    if kind == "responses":
        answered = answer if isinstance(answer, list) else []
        resent = resent_count(sent, is_output)
    else:
        answered = [] if answer is None else [answer]
        resent = resent_count(sent, is_assistant) if kind != "embeddings" else 0
    conversation_id: str = row["conversation_id"]
    linked = list(chain(sent))
    request_hash = linked[-1][0] if linked else None
    replied = list(chain(answered, request_hash or ROOT))
    message_rows = [
        message_row(conversation_id, digest, parent, message, started_at)
        for digest, parent, message in linked + replied
    ]
    row["request_hash"] = request_hash
    row["response_hash"] = replied[-1][0] if replied else None
    row["request_message_count"] = len(sent)
    row["params"] = _dumped(params)
    row["metadata"] = _dumped(row["metadata"])
    row["extra_choices"] = _dumped(row["extra_choices"] or None)
    attempts = row["attempts"]
    if attempts == attempts_of(None, row["upstream"], row["status_code"]):
        attempts = None  # one try: stored as none, listed from the upstream that answered
    row["attempts"] = _dumped(attempts or None)
    about = record.get("conversation") or {}
    conversation = {
        "id": conversation_id,
        "owner": row["owner"],
        "call_type": kind,
        "client_conversation_id": about.get("client_conversation_id"),
        "title": about.get("title"),
        "created_at": _time(about["created_at"], "created_at")
        if about.get("created_at")
        else started_at,
        "updated_at": started_at,
    }
    follows = None
    if (
        kind == "responses"
        and isinstance(params, dict)
        and not conversation["client_conversation_id"]
    ):
        previous = params.get("previous_response_id")
        follows = previous if isinstance(previous, str) and previous else None
    return RowSet(
        {COMPLETIONS: [row], CONVERSATIONS: [conversation], MESSAGES: message_rows},
        resent=resent,
        follows=follows,
    )


def conversation_extras(record: Any) -> tuple[str, str | None, str | None] | None:
    """A line's conversation metadata and tags, as stored (JSON text), where it has any:
    ``(conversation id, metadata, tags)``."""
    if not isinstance(record, dict) or not isinstance(record.get("conversation"), dict):
        return None
    about = record["conversation"]
    if about.get("metadata") is None and about.get("tags") is None:
        return None
    return record["conversation_id"], _dumped(about.get("metadata")), _dumped(about.get("tags"))


def _request_log_row(record: JSON) -> JSON:
    row: JSON = {name: record.get(name) for name in _REQUEST_LOG_COLUMNS}
    for name in ("id", "owner", "method", "path"):
        if not isinstance(row[name], str) or not row[name]:
            raise BadLine(f"{name!r} must be a non-empty string")
    row["started_at"] = _time(row["started_at"], "started_at")
    row["attempts"] = _dumped(row["attempts"] or None)
    row["bytes_in"] = row["bytes_in"] or 0
    row["bytes_out"] = row["bytes_out"] or 0
    return row


def _dumped(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _time(value: Any, name: str) -> datetime:
    """A time as the database keeps it: naive, in UTC."""
    if not isinstance(value, str):
        raise BadLine(f"{name!r} must be an ISO 8601 time")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed
