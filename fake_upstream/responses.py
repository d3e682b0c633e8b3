"""Bodies in OpenAI's wire format, built deterministically from the request.

The same request always gets the same id, timestamps, content, tool calls and usage,
streamed or not, so a test can compare what came through the gateway with what the
upstream answers directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import orjson

JSON = dict[str, Any]
FINGERPRINT = "fp_fake0001"
DEFAULT_CHUNKS = 8


def request_digest(request: JSON) -> str:
    basis = orjson.dumps(
        [request.get("model"), request.get("messages")], option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(basis).hexdigest()


def served_model(model: Any) -> str:
    return f"{model}-2024-08-06" if isinstance(model, str) else "gpt-fake-2024-08-06"


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def content_pieces(request: JSON, count: int) -> list[str]:
    """``count`` fragments of a deterministic answer, with some non-ASCII text in them."""
    topic = _last_user_text(request.get("messages"))[:40]
    words = [f"Echo: {topic}", " 你好,", "世界!"] + [f" word{i}" for i in range(count)]
    return words[:count] if count > 0 else []


def usage(request: JSON, completion_tokens: int) -> JSON:
    prompt_tokens = max(1, len(orjson.dumps(request.get("messages"))) // 4)
    cached = (prompt_tokens // 64) * 64 if prompt_tokens >= 64 else 0
    reasoning = completion_tokens * 2 if str(request.get("model", "")).startswith("o") else 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens + reasoning,
        "total_tokens": prompt_tokens + completion_tokens + reasoning,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def wants_tools(request: JSON) -> list[JSON]:
    """The tools the fake model calls: none unless tools are offered and the turn is open."""
    tools = request.get("tools")
    if not isinstance(tools, list) or not tools or request.get("tool_choice") == "none":
        return []
    messages = request.get("messages")
    if (
        isinstance(messages, list)
        and messages
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") == "tool"
    ):
        return []
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]
    ]
    choice = request.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        named = choice["function"].get("name")
        functions = [f for f in functions if f["name"] == named] or functions
    if request.get("parallel_tool_calls") is False:
        return functions[:1]
    return functions[:2]


def tool_calls(request: JSON, digest: str) -> list[JSON]:
    calls = []
    for index, function in enumerate(wants_tools(request)):
        arguments = orjson.dumps(
            {"query": _last_user_text(request.get("messages"))[:30], "unit": "celsius", "n": index}
        ).decode()
        calls.append(
            {
                "id": f"call_{digest[index * 8 : index * 8 + 24]}",
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return calls


def _limit(request: JSON) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _choice_count(request: JSON) -> int:
    n = request.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 8 else 1


class Answer:
    """What the fake model says to one request."""

    def __init__(self, request: JSON, chunks: int = DEFAULT_CHUNKS) -> None:
        self.request = request
        self.digest = request_digest(request)
        self.id = "chatcmpl-" + self.digest[:24]
        self.created = 1_700_000_000 + int(self.digest[:6], 16) % 10_000_000
        self.model = served_model(request.get("model"))
        self.calls = tool_calls(request, self.digest)
        pieces = content_pieces(request, chunks)
        limit = _limit(request)
        self.finish_reason = "tool_calls" if self.calls else "stop"
        if not self.calls and limit is not None and limit < len(pieces):
            pieces = pieces[:limit]
            self.finish_reason = "length"
        self.pieces = [] if self.calls else pieces
        self.choices = _choice_count(request)
        self.usage = usage(request, (len(self.pieces) or len(self.calls) * 5) * self.choices)

    def message(self) -> JSON:
        return {
            "role": "assistant",
            "content": None if self.calls else "".join(self.pieces),
            "refusal": None,
            "annotations": [],
            **({"tool_calls": self.calls} if self.calls else {}),
        }

    def completion(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": i,
                        "message": self.message(),
                        "logprobs": None,
                        "finish_reason": self.finish_reason,
                    }
                    for i in range(self.choices)
                ],
                "usage": self.usage,
                "service_tier": "default",
                "system_fingerprint": FINGERPRINT,
            }
        )

    def events(self, include_usage: bool) -> Iterator[bytes]:
        """Each SSE event of the streamed answer, ``data: [DONE]`` last."""
        base = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        }
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: JSON, finish: str | None = None) -> bytes:
            body = {
                **base,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
                **extra,
            }
            return b"data: " + orjson.dumps(body) + b"\n\n"

        for index in range(self.choices):
            yield chunk(
                index,
                {"role": "assistant", "content": "" if not self.calls else None, "refusal": None},
            )
            for piece in self.pieces:
                yield chunk(index, {"content": piece})
            for position, call in enumerate(self.calls):
                yield chunk(
                    index,
                    {
                        "tool_calls": [
                            {
                                "index": position,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        ]
                    },
                )
                arguments = call["function"]["arguments"]
                step = max(1, len(arguments) // 3)
                for start in range(0, len(arguments), step):
                    yield chunk(
                        index,
                        {
                            "tool_calls": [
                                {
                                    "index": position,
                                    "function": {"arguments": arguments[start : start + step]},
                                }
                            ]
                        },
                    )
            yield chunk(index, {}, self.finish_reason)
        if include_usage:
            yield b"data: " + orjson.dumps({**base, "choices": [], "usage": self.usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"


_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", "invalid_value", "Invalid value for 'messages'."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported.",
    ),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def error(status: int, message: str | None = None, param: str | None = None) -> bytes:
    kind, code, default = _ERRORS.get(
        status,
        ("invalid_request_error" if status < 500 else "server_error", None, f"Error {status}."),
    )
    return orjson.dumps(
        {"error": {"message": message or default, "type": kind, "param": param, "code": code}}
    )


def models() -> bytes:
    names = ["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"]
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
                for name in names
            ],
        }
    )


def model(name: str) -> bytes:
    return orjson.dumps(
        {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
    )


def embeddings(request: JSON) -> bytes:
    inputs = request.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for index, item in enumerate(items):
        digest = hashlib.sha256(orjson.dumps(item)).digest()
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": [round(b / 255 - 0.5, 6) for b in digest[:16]],
            }
        )
    tokens = sum(len(str(item)) // 4 + 1 for item in items)
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": request.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def text_completion(request: JSON) -> bytes:
    digest = hashlib.sha256(orjson.dumps(request.get("prompt"))).hexdigest()
    return orjson.dumps(
        {
            "id": "cmpl-" + digest[:24],
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": request.get("model"),
            "choices": [
                {
                    "text": " fake continuation",
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )
