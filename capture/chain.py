"""Content addresses for messages: each message's hash covers its canonical JSON and its
parent's hash, so a hash names a message *and* everything before it, as in a git history.

Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

ROOT = ""


def canonical(message: Any) -> bytes:
    """One byte form per JSON value: keys sorted, no whitespace."""
    return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)


def link(parent_hash: str, body: bytes) -> str:
    digest = hashlib.sha256(parent_hash.encode())
    digest.update(b"\n")
    digest.update(body)  # not joined first: a copy of a long message costs more
    return digest.hexdigest()


def chain(messages: Sequence[Any], parent_hash: str = ROOT) -> Iterator[tuple[str, str, Any]]:
    """(hash, parent_hash, message) for each message, in order."""
    for message in messages:
        digest = link(parent_hash, canonical(message))
        yield digest, parent_hash, message
        parent_hash = digest


def content_text(message: Any) -> str | None:
    """The searchable text of a message or item: its string content, or its text parts
    joined; else a refusal, a tool's output, a call's arguments, a reasoning summary."""
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
    if content is None:
        for key in ("refusal", "output", "arguments", "input"):  # tool calls and results
            if isinstance(message.get(key), str):
                return str(message[key])
    summary = message.get("summary")  # a Responses reasoning item
    if isinstance(summary, list):
        texts = [
            p["text"] for p in summary if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return "\n".join(texts) if texts else None
    return None


# What a client may change in an assistant message when it sends it back: SDKs and
# frameworks drop nulls and empty lists, add or drop `refusal` and `annotations`, send
# text parts for a string, and leave out a streamed tool call's `index`. Identity for
# recognising a continued conversation looks only at what survives all of that.
def match_form(message: Any) -> Any:
    """The part of a message that says which message it is, for recognising continuations."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return _without_empties(message)
    content = message.get("content")
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" for part in content
    ):
        content = "".join(str(part.get("text", "")) for part in content)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        calls = [_call_identity(call) for call in calls]
    form = {
        "role": "assistant",
        "content": content,
        "tool_calls": calls,
        "function_call": message.get("function_call"),
        "name": message.get("name"),
    }
    return _without_empties(form)


def continuation_key(messages: Sequence[Any], digests: Sequence[str] = ()) -> str | None:
    """The identity of the first exchange in ``messages``: everything up to and including
    the first assistant message, in match form. None when there is no assistant message.

    A first request together with its answer, and every later request that resends them,
    share this key, whichever gateway process sees them and in whatever order.

    ``digests``, when given, are the hashes ``chain`` gave the same messages. A message that
    is its own match form (not an assistant's, every value a non-empty string: a system or
    user message, mostly) links the same in both, so its hash is taken, not computed again.
    """
    parent = ROOT
    taken = True  # every hash so far was taken from ``digests``: the parents agree
    for index, message in enumerate(messages):
        assistant = isinstance(message, dict) and message.get("role") == "assistant"
        if taken and not assistant and index < len(digests) and _own_match_form(message):
            parent = digests[index]
        else:
            taken = False
            parent = link(parent, canonical(match_form(message)))
        if assistant:
            return parent
    return None


def _own_match_form(message: Any) -> bool:
    return isinstance(message, dict) and all(
        type(value) is str and value for value in message.values()
    )


def _call_identity(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if isinstance(function, dict):
        function = {"name": function.get("name"), "arguments": function.get("arguments")}
    return {"id": call.get("id"), "function": function}


def _without_empties(value: Any) -> Any:
    if isinstance(value, dict):
        kept = {}
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                v = _without_empties(v)
            if v not in _EMPTY:
                kept[k] = v
        return kept
    if isinstance(value, list):
        return [_without_empties(v) for v in value]
    return value


# What a client may drop or add without changing a message.
_EMPTY: tuple[Any, ...] = (None, "", [], {})


def exchange_key(
    items: Sequence[Any], form: Callable[[Any], Any], answers: Callable[[Any], bool]
) -> str | None:
    """The identity of the first exchange in ``items``: everything up to and including the
    first item of an answer, each in its match ``form`` (a form of None left out). None when
    no item answers."""
    parent = ROOT
    for item in items:
        shape = form(item)
        if shape is None:
            continue
        parent = link(parent, canonical(shape))
        if answers(item):
            return parent
    return None
