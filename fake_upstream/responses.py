"""Bodies in OpenAI's wire format, built deterministically from the request.

The same request always gets the same id, timestamps, content, tool calls and usage,
streamed or not, so a test can compare what came through the gateway with what the
upstream answers directly.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import struct
import sys
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


def answer_words(topic: str, count: int) -> list[str]:
    """``count`` fragments of the fake model's answer about ``topic``, some of them non-ASCII."""
    words = [f"Echo: {topic[:40]}", " 你好,", "世界!"] + [f" word{i}" for i in range(count)]
    return words[:count] if count > 0 else []


def content_pieces(request: JSON, count: int) -> list[str]:
    """``count`` fragments of a deterministic answer, with some non-ASCII text in them."""
    return answer_words(_last_user_text(request.get("messages")), count)


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


_TABLE: Any = object()  # ``error``'s default: the type and code of the status, from _ERRORS


def error(
    status: int,
    message: str | None = None,
    param: str | None = None,
    *,
    code: str | None = _TABLE,
    kind: str | None = None,
) -> bytes:
    """OpenAI's error body for ``status``; ``code`` and ``kind`` (its ``type``) override the
    usual ones of that status (``code=None`` gives ``"code": null``)."""
    usual_kind, usual_code, default = _ERRORS.get(
        status,
        ("invalid_request_error" if status < 500 else "server_error", None, f"Error {status}."),
    )
    return orjson.dumps(
        {
            "error": {
                "message": message or default,
                "type": kind or usual_kind,
                "param": param,
                "code": usual_code if code is _TABLE else code,
            }
        }
    )


def missing(name: str) -> bytes:
    """The 400 body of a request without a parameter it needs."""
    return error(
        400, f"Missing required parameter: '{name}'.", name, code="missing_required_parameter"
    )


def models(names: list[str] | None = None) -> bytes:
    names = names or ["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"]
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


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _inputs(value: Any) -> list[str | list[int]] | None:
    """The separate inputs of an embeddings ``input`` or a completions ``prompt``: a string, a
    list of strings, an array of token ids or a list of such arrays. None if it is none of
    these."""
    if isinstance(value, str):
        return [value]
    if _is_tokens(value):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(_is_tokens(item) for item in value):
            return list(value)
    return None


def _tokens(item: str | list[int]) -> int:
    return len(item) if isinstance(item, list) else len(item) // 4 + 1


def _dimensions(model: str) -> int:
    return 3072 if "3-large" in model else 1536


def _vector(model: str, item: str | list[int], size: int, dimensions: int) -> array.array[float]:
    """A unit vector, the same for the same model and input; shortened to ``dimensions`` and
    normalised again, as OpenAI shortens its embeddings."""
    seed = hashlib.sha256(orjson.dumps([model, item])).digest()
    raw = struct.unpack(f"<{size}H", hashlib.shake_256(seed).digest(2 * size))[:dimensions]
    centred = [value / 32767.5 - 1.0 for value in raw]
    norm = math.sqrt(sum(value * value for value in centred)) or 1.0
    return array.array("f", [value / norm for value in centred])


def embeddings(request: JSON) -> tuple[int, bytes]:
    """``(status, body)`` of ``POST /v1/embeddings``. The vectors are float32, as OpenAI's are:
    ``encoding_format: "base64"`` gives the little-endian bytes of the same numbers."""
    model = request.get("model")
    if not isinstance(model, str) or not model:
        return 400, missing("model")
    if request.get("input") is None:
        return 400, missing("input")
    items = _inputs(request.get("input"))
    if items is None or any(item == "" for item in items):
        return 400, error(400, "'$.input' is invalid. Please check the API reference.", "input")
    size = _dimensions(model)
    dimensions = request.get("dimensions")
    if dimensions is not None:
        if not model.startswith("text-embedding-3"):
            return 400, error(
                400, "This model does not support specifying dimensions.", "dimensions"
            )
        if not isinstance(dimensions, int) or isinstance(dimensions, bool):
            return 400, error(
                400, "Invalid type for 'dimensions'.", "dimensions", code="invalid_type"
            )
        if not 1 <= dimensions <= size:
            return 400, error(
                400, f"Invalid value for 'dimensions': it must be 1 to {size}.", "dimensions"
            )
    encoding = request.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return 400, error(400, "Invalid value for 'encoding_format'.", "encoding_format")
    data = []
    for index, item in enumerate(items):
        vector = _vector(model, item, size, dimensions or size)
        if encoding == "base64":
            if sys.byteorder == "big":
                vector.byteswap()
            embedded: Any = base64.b64encode(vector.tobytes()).decode()
        else:
            embedded = vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedded})
    tokens = sum(_tokens(item) for item in items)
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return 200, orjson.dumps(body)


class TextCompletion:
    """What the fake model says to a legacy ``POST /v1/completions``: one choice for each
    prompt and each of its ``n``, cut at ``max_tokens`` (16 unless given) pieces."""

    def __init__(self, request: JSON, prompts: list[str | list[int]], chunks: int) -> None:
        digest = hashlib.sha256(
            orjson.dumps([request.get("model"), request.get("prompt")])
        ).hexdigest()
        self.id = "cmpl-" + digest[:29]
        self.created = 1_700_000_000 + int(digest[:6], 16) % 10_000_000
        self.model = request.get("model")
        limit = request.get("max_tokens")
        limit = 16 if not isinstance(limit, int) or isinstance(limit, bool) else max(0, limit)
        self.echo = request.get("echo") is True
        self.n = _choice_count(request)
        self.prompts = prompts
        self.pieces = []
        self.finish_reasons = []
        for prompt in prompts:
            pieces = answer_words(prompt if isinstance(prompt, str) else "", chunks)
            self.pieces.append(pieces[:limit])
            self.finish_reasons.append("length" if limit < len(pieces) else "stop")
        completion = sum(len(pieces) for pieces in self.pieces) * self.n
        prompt_tokens = sum(_tokens(prompt) for prompt in prompts)
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def _choices(self) -> Iterator[tuple[int, str, list[str], str]]:
        """Each choice's index, echoed prompt, pieces and finish reason, in OpenAI's order."""
        for number, prompt in enumerate(self.prompts):
            echoed = prompt if self.echo and isinstance(prompt, str) else ""
            for copy in range(self.n):
                index = number * self.n + copy
                yield index, echoed, self.pieces[number], self.finish_reasons[number]

    def completion(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "text": echoed + "".join(pieces),
                        "index": index,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for index, echoed, pieces, finish in self._choices()
                ],
                "usage": self.usage,
            }
        )

    def events(self, include_usage: bool) -> Iterator[bytes]:
        """Each SSE event of the streamed answer, ``data: [DONE]`` last; with
        ``include_usage``, a last chunk without choices carries the usage, and the others
        ``"usage": null``, as the chat stream does."""
        base = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
        }
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, text: str, finish: str | None = None) -> bytes:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            return b"data: " + orjson.dumps({**base, "choices": [choice], **extra}) + b"\n\n"

        for index, echoed, pieces, finish in self._choices():
            if echoed:
                yield chunk(index, echoed)
            for piece in pieces:
                yield chunk(index, piece)
            yield chunk(index, "", finish)
        if include_usage:
            yield b"data: " + orjson.dumps({**base, "choices": [], "usage": self.usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"


def text_completion(request: JSON, chunks: int = DEFAULT_CHUNKS) -> TextCompletion | bytes:
    """The answer to a legacy completions request, or the body of its 400 error."""
    model = request.get("model")
    if not isinstance(model, str) or not model:
        return missing("model")
    prompt = request.get("prompt")
    prompts: list[str | list[int]] | None = [""] if prompt is None else _inputs(prompt)
    if prompts is None:
        return error(400, "Invalid type for 'prompt'.", "prompt", code="invalid_type")
    return TextCompletion(request, prompts, chunks)
