"""Captured completions in OpenAI's shapes: the stored-completions objects, and fine-tuning
examples. Pure functions over a completion row and its rebuilt messages.

OpenAI's schema allows five finish reasons. A stream the client left or the upstream broke
off is recorded as ``client_disconnected`` or ``upstream_disconnected``; these objects say
``length`` (the answer was cut short) and keep the recorded reason, with the gateway's other
facts about the completion, in an ``mes`` field that OpenAI's SDK keeps as an extra.
"""

from __future__ import annotations

import calendar
from typing import Any

import orjson
from sqlalchemy.engine import RowMapping

from storage.browse import public_id

JSON = dict[str, Any]
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
FINE_TUNING_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
PART_TYPES = frozenset({"text", "image_url"})


def completion_object(row: RowMapping, answer: Any) -> JSON:
    """A ``chat.completion`` as OpenAI's stored-completions API returns it."""
    choices = []
    if isinstance(answer, dict):
        choices.append(_choice(0, answer, row["finish_reason"]))
    for extra in stored_json(row["extra_choices"]) or ():
        if isinstance(extra, dict) and isinstance(extra.get("message"), dict):
            choices.append(_choice(extra.get("index", 0), extra["message"], extra["finish_reason"]))
    body: JSON = {
        "id": public_id(row),
        "object": "chat.completion",
        "created": row["upstream_created"] or calendar.timegm(row["started_at"].timetuple()),
        "model": row["response_model"] or row["requested_model"] or "",
        "choices": choices,
        "metadata": metadata(row["metadata"]),
    }
    usage = _usage(row)
    if usage is not None:
        body["usage"] = usage
    if row["system_fingerprint"]:
        body["system_fingerprint"] = row["system_fingerprint"]
    body["mes"] = {
        "record_id": row["id"],
        "conversation_id": row["conversation_id"],
        "finish_reason": row["finish_reason"],
        "status_code": row["status_code"],
        "stream": bool(row["stream"]),
        "latency_ms": row["latency_ms"],
        "ttft_ms": row["ttft_ms"],
    }
    return body


def message_objects(completion_id: str, request: list[Any]) -> list[JSON]:
    """The request's messages as OpenAI lists them, with ids ``<completion id>-<index>``."""
    out = []
    for index, message in enumerate(request):
        message = message if isinstance(message, dict) else {}
        content = message.get("content")
        parts = None
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict) and p.get("type") in PART_TYPES]
            texts = [p["text"] for p in parts if isinstance(p.get("text"), str)]
            content = "\n".join(texts) if texts else None
        item: JSON = {
            "id": f"{completion_id}-{index}",
            "role": message.get("role"),
            "content": content if isinstance(content, str) else None,
            "refusal": message.get("refusal") if isinstance(message.get("refusal"), str) else None,
            "name": message.get("name") if isinstance(message.get("name"), str) else None,
            "content_parts": parts,
        }
        for key in ("tool_calls", "tool_call_id", "function_call", "audio"):
            if message.get(key) is not None:
                item[key] = message[key]
        out.append(item)
    return out


def fine_tuning_example(row: RowMapping, request: list[Any], answer: Any) -> JSON | None:
    """One line of OpenAI's chat fine-tuning format, or None when the completion cannot be
    one (no answer, or a message in a role fine-tuning does not take)."""
    if not isinstance(answer, dict) or not request:
        return None
    turns = [_trimmed(m) for m in request] + [_trimmed(_assistant(answer))]
    if any(not isinstance(m, dict) or m.get("role") not in FINE_TUNING_ROLES for m in turns):
        return None
    example: JSON = {"messages": turns}
    params = stored_json(row["params"]) or {}
    if isinstance(params.get("tools"), list):
        example["tools"] = params["tools"]
    if isinstance(params.get("parallel_tool_calls"), bool):
        example["parallel_tool_calls"] = params["parallel_tool_calls"]
    return example


def metadata(raw: str | None) -> dict[str, str] | None:
    value = stored_json(raw)
    if not isinstance(value, dict):
        return None
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def _choice(index: Any, message: JSON, finish_reason: str | None) -> JSON:
    if finish_reason not in FINISH_REASONS:
        finish_reason = "length" if finish_reason else "stop"
    return {
        "index": index if isinstance(index, int) else 0,
        "message": _assistant(message),
        "finish_reason": finish_reason,
        "logprobs": None,
    }


def _assistant(message: JSON) -> JSON:
    out: JSON = {
        "role": "assistant",
        "content": message.get("content") if isinstance(message.get("content"), str) else None,
        "refusal": message.get("refusal") if isinstance(message.get("refusal"), str) else None,
    }
    for key in ("tool_calls", "function_call", "annotations", "audio"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


def _trimmed(message: Any) -> Any:
    """A message without null or empty fields (fine-tuning refuses ``"tool_calls": null``)."""
    if not isinstance(message, dict):
        return message
    return {k: v for k, v in message.items() if v not in (None, [], {}) and k != "annotations"}


def _usage(row: RowMapping) -> JSON | None:
    stored = stored_json(row["usage"])
    if isinstance(stored, dict) and all(
        isinstance(stored.get(k), int) for k in ("prompt_tokens", "completion_tokens")
    ):
        return stored
    if row["total_tokens"] is None:
        return None
    return {
        "prompt_tokens": row["prompt_tokens"] or 0,
        "completion_tokens": row["completion_tokens"] or 0,
        "total_tokens": row["total_tokens"],
    }


def stored_json(raw: str | None) -> Any:
    """A JSON column's value (written by orjson), or None."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
