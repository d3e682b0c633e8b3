"""A stored record as an OpenTelemetry span, after the GenAI semantic conventions
(``gen_ai.*``): what it was (operation, provider, models, response id, finish reasons),
what it cost (tokens, dollars), how it ended, when. Built from the record's rows, as the
writer stored them, never on the request path. Pure: the exporter
(``storage/telemetry.py``) turns a ``Span`` into the SDK's.

Message content goes in only when asked for (``content``), as the conventions'
``gen_ai.input.messages`` and ``gen_ai.output.messages``: JSON, each message a role and its
parts (text, tool calls, tool results).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from capture.message_rows import stored_message
from capture.rows import Row, RowSet

# Each kind of record's operation, as the conventions name them.
OPERATIONS = {
    "chat": "chat",
    "responses": "chat",
    "messages": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
# Whose API a kind is, for an upstream whose provider is not known (a local model, say).
API_OWNERS = {"messages": "anthropic"}

Attribute = str | int | float | bool | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Span:
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Attribute]
    error: str | None = None  # the error's type: the span's status is then ERROR
    traceparent: str | None = None  # the caller's W3C trace context: this span is its child
    events: list[tuple[str, int]] = field(default_factory=list)  # (name, time): first token


def span_of(
    rows: RowSet, provider: str | None, content: bool, traceparent: str | None = None
) -> Span | None:
    """The span of one record's rows; None for a record that is not a call (a request log).
    ``provider`` is the upstream's, as prices know it (``storage/prices.py``)."""
    completion = rows.completion
    if completion is None:
        return None
    kind = completion.get("call_type") or "chat"
    operation = OPERATIONS.get(kind, kind)
    model = completion.get("requested_model")
    attributes: dict[str, Attribute] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider or API_OWNERS.get(kind, "openai"),
    }
    _put(attributes, "gen_ai.request.model", model)
    _put(attributes, "gen_ai.response.model", completion.get("response_model"))
    _put(attributes, "gen_ai.response.id", completion.get("response_id"))
    finish = _finish_reasons(completion)
    if finish:
        attributes["gen_ai.response.finish_reasons"] = tuple(finish)
    _put(attributes, "gen_ai.usage.input_tokens", completion.get("prompt_tokens"))
    _put(attributes, "gen_ai.usage.output_tokens", completion.get("completion_tokens"))
    _put(attributes, "gen_ai.usage.cache_read.input_tokens", completion.get("cached_tokens"))
    _put(
        attributes,
        "gen_ai.usage.cache_creation.input_tokens",
        completion.get("cache_write_tokens"),
    )
    _put(attributes, "gen_ai.conversation.id", completion.get("conversation_id"))
    _put(attributes, "mes.cost_usd", completion.get("cost_usd"))
    _put(attributes, "mes.completion_id", completion.get("id"))
    _put(attributes, "mes.owner", completion.get("owner"))
    _put(attributes, "mes.upstream", completion.get("upstream"))
    _put(attributes, "http.response.status_code", completion.get("status_code"))
    attributes["gen_ai.request.stream"] = bool(completion.get("stream"))
    error = completion.get("error_type") or (
        f"{completion['status_code']}" if (completion.get("status_code") or 0) >= 400 else None
    )
    if error:
        attributes["error.type"] = error
    if content:
        sent, answered = _messages(rows, completion)
        attributes["gen_ai.input.messages"] = orjson.dumps(sent).decode()
        if answered:
            attributes["gen_ai.output.messages"] = orjson.dumps(answered).decode()
    start = _nanoseconds(completion["started_at"])
    end = start + int((completion.get("latency_ms") or 0) * 1e6)
    events = []
    if completion.get("ttft_ms") is not None:
        events.append(("gen_ai.first_token", start + int(completion["ttft_ms"] * 1e6)))
    name = f"{operation} {model}" if model else operation
    return Span(name, start, max(end, start), attributes, error, traceparent, events)


def _put(attributes: dict[str, Attribute], name: str, value: Any) -> None:
    if value is not None and value != "":
        attributes[name] = value


def _finish_reasons(completion: Row) -> list[str]:
    reasons = [completion["finish_reason"]] if completion.get("finish_reason") else []
    extra = completion.get("extra_choices")
    if extra:
        for choice in orjson.loads(extra):
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                reasons.append(choice["finish_reason"])
    return reasons


def _nanoseconds(moment: datetime) -> int:
    """A naive UTC time (as stored) in nanoseconds since the epoch."""
    return int(moment.replace(tzinfo=UTC).timestamp() * 1e9)


def _messages(rows: RowSet, completion: Row) -> tuple[list[Any], list[Any]]:
    """The request's messages and the answer's, in the conventions' form."""
    answer = completion.get("response_hash")
    sent: list[Any] = []
    answered: list[Any] = []
    for row in rows.messages:
        message = _parts(stored_message(row))
        (answered if row["hash"] == answer else sent).append(message)
    return sent, answered


def _parts(message: Any) -> Any:
    """A message as a role and its parts: text, tool calls, tool results. Anything else is
    kept as it was sent."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return message
    parts: list[dict[str, Any]] = []
    content = message.get("content")
    if message["role"] == "tool":
        parts.append(
            {"type": "tool_call_response", "id": message.get("tool_call_id"), "response": content}
        )
    elif isinstance(content, str):
        parts.append({"type": "text", "content": content})
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append({"type": "text", "content": part["text"]})
            else:
                parts.append({"type": "other", "content": part})
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts.append(
                {
                    "type": "tool_call",
                    "id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": function.get("arguments"),
                }
            )
    return {"role": message["role"], "parts": parts}
