"""How one message is kept in the ``messages`` table, and read back exactly.

A message whose ``content`` is a string (most of them) is split: the string goes to
``content_text``, where search reads it, and ``body`` keeps the rest of the message's
canonical JSON; ``content_in_text`` says so. The text is stored once, not once in the JSON
and again for search. Any other message keeps its whole JSON in ``body``, and
``content_text`` holds its searchable text (text parts joined, or a refusal), if any.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from capture import columns
from capture.chain import canonical, content_text

JSON = dict[str, Any]


def message_row(
    conversation_id: str, digest: str, parent: str, message: Any, created_at: datetime
) -> JSON:
    role = content = None
    if isinstance(message, dict):
        # A Responses item that is not a message (a call, its output, reasoning): its type.
        role, content = message.get("role") or message.get("type"), message.get("content")
    # PostgreSQL's text cannot hold NUL: such content stays in the JSON, where it is escaped.
    split = isinstance(content, str) and "\x00" not in content
    if not split:
        body, text = canonical(message).decode(), content_text(message)
    elif len(message) == 2 and "role" in message and type(role) is str and role in _ROLE_ONLY:
        body, text = _ROLE_ONLY[role], content
    else:
        rest = dict(message)
        del rest["content"]
        body, text = canonical(rest).decode(), content
    return {
        "conversation_id": conversation_id,
        "hash": digest,
        "parent_hash": parent or None,
        "role": str(role)[: columns.ROLE] if role else "unknown",
        "body": body,
        "content_text": text,
        "content_in_text": split,
        "created_at": created_at,
        "content_dropped": False,
    }


# The body of a message that is a role and its text, most of them: the role alone.
_ROLE_ONLY = {
    role: canonical({"role": role}).decode()
    for role in ("system", "developer", "user", "assistant", "tool", "function")
}


def stored_message(row: Mapping[Any, Any]) -> JSON:
    """The message as it was sent or answered, from a row with body, content_text and
    content_in_text."""
    message: JSON = orjson.loads(row["body"])
    if row["content_in_text"]:
        message["content"] = row["content_text"]
    return message
