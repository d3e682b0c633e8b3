"""Content addresses for messages: each message's hash covers its canonical JSON and its
parent's hash, so a hash names a message *and* everything before it, as in a git history.

Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

ROOT = ""


def canonical(message: Any) -> bytes:
    """One byte form per JSON value: keys sorted, no whitespace."""
    return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)


def link(parent_hash: str, body: bytes) -> str:
    return hashlib.sha256(parent_hash.encode() + b"\n" + body).hexdigest()


def chain(messages: Sequence[Any], parent_hash: str = ROOT) -> Iterator[tuple[str, str, bytes]]:
    """(hash, parent_hash, canonical body) for each message, in order."""
    for message in messages:
        body = canonical(message)
        digest = link(parent_hash, body)
        yield digest, parent_hash, body
        parent_hash = digest


def content_text(message: Any) -> str | None:
    """The searchable text of a message: its string content, or its text parts joined."""
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts) if texts else None
    refusal = message.get("refusal")
    return refusal if isinstance(refusal, str) else None
