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

from sqlalchemy.engine import RowMapping

from storage.browse import public_id
from storage.exports import stored_json

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
    """One line of OpenAI's chat fine-tuning format, or None when the record cannot be one
    (not a chat or Responses call, no answer, or a message in a role fine-tuning does not
    take). A Responses call's items are taken as the chat messages they stand for."""
    params = stored_json(row["params"]) or {}
    tools = params.get("tools")
    if row["call_type"] == "responses":
        instructions = params.get("instructions")
        system = [{"role": "system", "content": instructions}] if instructions else []
        sent, answered = as_chat(request), as_chat(answer if isinstance(answer, list) else [])
        if sent is None or not answered or answered[-1]["role"] != "assistant":
            return None
        request, answer = system + sent + answered[:-1], answered[-1]
        if isinstance(tools, list):
            tools = [_chat_tool(tool) for tool in tools]
            tools = None if None in tools else tools
    elif row["call_type"] != "chat":
        return None
    if not isinstance(answer, dict) or not request:
        return None
    turns = [_trimmed(m) for m in request] + [_trimmed(_assistant(answer))]
    if any(not isinstance(m, dict) or m.get("role") not in FINE_TUNING_ROLES for m in turns):
        return None
    example: JSON = {"messages": turns}
    if isinstance(tools, list):
        example["tools"] = tools
    if isinstance(params.get("parallel_tool_calls"), bool):
        example["parallel_tool_calls"] = params["parallel_tool_calls"]
    return example


def as_chat(items: list[Any]) -> list[JSON] | None:
    """Responses items as the chat messages they stand for: messages with their text (and
    images), function calls as an assistant's ``tool_calls``, their outputs as ``tool``
    messages; reasoning left out. None if an item has no chat form (a built-in tool's call,
    a file)."""
    messages: list[JSON] = []
    for item in items:
        if not isinstance(item, dict):
            return None
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue
        if kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output" and isinstance(item.get("output"), str):
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": item["output"]}
            )
        elif kind == "message" and item.get("role") in FINE_TUNING_ROLES:
            content = _chat_content(item.get("content"))
            if content is None:
                return None
            messages.append({"role": item["role"], "content": content})
        else:
            return None
    return messages


def _chat_content(content: Any) -> str | list[JSON] | None:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts: list[JSON] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            return None
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _chat_tool(tool: Any) -> JSON | None:
    """A Responses function tool as chat's; None for any other tool."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return None
    function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
    return {"type": "function", "function": function}


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
