"""The fake upstream's Anthropic Messages API (``POST /v1/messages``, and
``/v1/messages/count_tokens``), as Anthropic's API answers: what the ``anthropic`` SDK's own
types parse, streamed (``message_start``, content blocks and their deltas, ``message_delta``,
``message_stop``, a ``ping`` among them) and not.

What the fake model says follows from the request, deterministically:

- thinking enabled (``"thinking": {"type": "enabled", ...}``): a thinking block first, with
  its signature;
- tools offered and the last message not a tool result: a ``tool_use`` block calling the
  first tool, ``stop_reason`` ``tool_use``; otherwise text echoing the last user message,
  ``end_turn`` (or ``max_tokens`` when ``max_tokens`` is under the answer's length);
- usage: input tokens from the request's size; with any ``cache_control`` marker in it, half
  of them written to the cache on a first turn (one message) and read from it after.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import orjson

from fake_upstream.responses import answer_words
from fake_upstream.responses_api import split, sse

JSON = dict[str, Any]


def error(status: int, message: str | None = None) -> bytes:
    """Anthropic's error body for ``status``."""
    kind = _ERRORS.get(status, "api_error")
    return orjson.dumps(
        {"type": "error", "error": {"type": kind, "message": message or f"Error {status}."}}
    )


_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def validate(request: Any) -> bytes | None:
    """The error body for a request Anthropic would refuse, or None."""
    if not isinstance(request, dict):
        return error(400, "The body must be a JSON object.")
    if not isinstance(request.get("model"), str):
        return error(400, "model: Field required")
    if not isinstance(request.get("messages"), list):
        return error(400, "messages: Field required")
    if not isinstance(request.get("max_tokens"), int):
        return error(400, "max_tokens: Field required")
    return None


def count_tokens(request: JSON) -> bytes:
    return orjson.dumps({"input_tokens": _input_size(request)})


def _input_size(request: JSON) -> int:
    sent = [request.get("system"), request.get("messages"), request.get("tools")]
    return max(1, len(orjson.dumps(sent)) // 4)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(block.get("text", ""))
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


class Reply:
    """What the fake model answers one request."""

    def __init__(self, request: JSON, chunks: int) -> None:
        self.request = request
        digest = hashlib.sha256(
            orjson.dumps(
                [request.get("model"), request.get("messages")], option=orjson.OPT_SORT_KEYS
            )
        ).hexdigest()
        self.id = f"msg_{digest[:24]}"
        self.model = request["model"]
        messages = request["messages"]
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        content = last.get("content")
        answered_tool = isinstance(content, list) and any(
            isinstance(block, dict) and block.get("type") == "tool_result" for block in content
        )
        self.topic = _text_of(content) or "a tool's result"
        tools = [t for t in request.get("tools") or [] if isinstance(t, dict) and "name" in t]
        self.tool = tools[0] if tools and not answered_tool else None
        thinking = request.get("thinking")
        self.thinks = isinstance(thinking, dict) and thinking.get("type") == "enabled"
        self.pieces = answer_words(self.topic, chunks)
        self.tool_id = f"toolu_{digest[24:48]}"
        self.output_tokens = len(self.pieces) + (12 if self.tool else 0) + (9 if self.thinks else 0)
        limit = request["max_tokens"]
        self.stop_reason = "tool_use" if self.tool else "end_turn"
        if limit < self.output_tokens:
            self.stop_reason, self.output_tokens = "max_tokens", limit

    def _usage(self) -> JSON:
        size = _input_size(self.request)
        cached = b'"cache_control"' in orjson.dumps(self.request)
        first_turn = len(self.request["messages"]) <= 1
        written = size // 2 if cached and first_turn else 0
        read = size // 2 if cached and not first_turn else 0
        return {
            "input_tokens": size - written - read,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "output_tokens": self.output_tokens,
            "service_tier": "standard",
        }

    def _thinking(self) -> str:
        return f"The user asks about {self.topic[:30]}; answer briefly."

    def _signature(self) -> str:
        return "sig_" + hashlib.sha256(self._thinking().encode()).hexdigest()[:40]

    def _arguments(self) -> JSON:
        return {"query": self.topic[:30], "unit": "celsius"}

    def blocks(self) -> list[JSON]:
        blocks: list[JSON] = []
        if self.thinks:
            blocks.append(
                {"type": "thinking", "thinking": self._thinking(), "signature": self._signature()}
            )
        if self.tool is not None:
            blocks.append(
                {
                    "type": "tool_use",
                    "id": self.tool_id,
                    "name": self.tool["name"],
                    "input": self._arguments(),
                }
            )
        else:
            blocks.append({"type": "text", "text": "".join(self.pieces)})
        return blocks

    def message(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": self.blocks(),
                "stop_reason": self.stop_reason,
                "stop_sequence": None,
                "usage": self._usage(),
            }
        )

    def events(self) -> Iterator[bytes]:
        usage = self._usage()
        start = {**usage, "output_tokens": 1}
        yield sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start,
                },
            },
        )
        index = 0
        if self.thinks:
            yield _block_start(index, {"type": "thinking", "thinking": "", "signature": ""})
            yield sse("ping", {"type": "ping"})
            for piece in split(self._thinking(), 3):
                yield _delta(index, {"type": "thinking_delta", "thinking": piece})
            yield _delta(index, {"type": "signature_delta", "signature": self._signature()})
            yield sse("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        if self.tool is not None:
            block = {"type": "tool_use", "id": self.tool_id, "name": self.tool["name"], "input": {}}
            yield _block_start(index, block)
            for piece in split(orjson.dumps(self._arguments()).decode(), 3):
                yield _delta(index, {"type": "input_json_delta", "partial_json": piece})
        else:
            yield _block_start(index, {"type": "text", "text": ""})
            if not self.thinks:
                yield sse("ping", {"type": "ping"})
            for piece in self.pieces:
                yield _delta(index, {"type": "text_delta", "text": piece})
        yield sse("content_block_stop", {"type": "content_block_stop", "index": index})
        yield sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                "usage": {
                    "output_tokens": usage["output_tokens"],
                    "input_tokens": usage["input_tokens"],
                    "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                    "cache_read_input_tokens": usage["cache_read_input_tokens"],
                },
            },
        )
        yield sse("message_stop", {"type": "message_stop"})


def _block_start(index: int, block: JSON) -> bytes:
    return sse(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def _delta(index: int, delta: JSON) -> bytes:
    return sse(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )
