"""What every captured API's whole answer has in common: a JSON object, or an error, and the
id of the conversation a record belongs to. Pure functions, no I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from capture.rows import text_or_none

JSON = dict[str, Any]
ERROR_TEXT = 2000  # characters of an error body that is not OpenAI's error object


@dataclass(frozen=True, slots=True)
class Body:
    """An answer's body read: the object of a success, or what went wrong."""

    parsed: JSON | None = None  # the object of a success
    error_type: str | None = None
    error_message: str | None = None
    whole: bool = False  # the body was a JSON object (a cut or empty one is not)


def read_body(body: bytes, status: int, is_error: Callable[[JSON], bool]) -> Body:
    """The answer ``body`` with ``status``; ``is_error`` says whether an object answered
    with a success status is an error all the same. OpenAI's error object gives the error's
    type (or code) and message; any other error body is kept as text, shortened."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        text = body[:ERROR_TEXT].decode(errors="replace") if status >= 400 and body else None
        return Body(error_message=text)
    if status < 400 and not is_error(parsed):
        return Body(parsed, whole=True)
    error = parsed.get("error")
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        return Body(
            error_type=str(kind) if kind else None,
            error_message=text_or_none(error.get("message")),
            whole=True,
        )
    text = orjson.dumps(parsed)[:ERROR_TEXT].decode(errors="replace")
    return Body(error_message=text, whole=True)


def conversation_key(owner: str, *named: str) -> str:
    """A conversation's id: named within its owner's history, so that two callers naming
    the same conversation, or sending the same words, never share one."""
    scoped = "\n".join((owner, *named))
    return hashlib.sha256(scoped.encode()).hexdigest()[:32]
