"""Reassembles a streamed chat completion from its ``chat.completion.chunk`` objects.

Pure logic over parsed chunks: content and refusal fragments joined, tool calls rebuilt from
their deltas (the first delta of a call carries its index, id, type and name; later ones add
argument fragments by index), finish reasons and usage kept as sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


@dataclass
class _Choice:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, JSON] = field(default_factory=dict)
    arguments: dict[int, list[str]] = field(default_factory=dict)
    function_call: JSON | None = None
    finish_reason: str | None = None
    saw_content: bool = False

    def message(self) -> JSON:
        message: JSON = {
            "role": self.role,
            "content": "".join(self.content) if self.content or self.saw_content else None,
        }
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            calls = []
            for index in sorted(self.tool_calls):
                call = self.tool_calls[index]
                call["function"]["arguments"] = "".join(self.arguments.get(index, []))
                calls.append(call)
            message["tool_calls"] = calls
        if self.function_call is not None:
            message["function_call"] = self.function_call
        return message


class StreamAccumulator:
    """Add chunks in order; ``choices()`` gives each choice's final message."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.system_fingerprint: str | None = None
        self.usage: JSON | None = None
        self._choices: dict[int, _Choice] = {}

    def add(self, chunk: JSON) -> bool:
        """Take one chunk; True when it carried part of the answer (content, refusal, tools)."""
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        self.created = self.created or chunk.get("created")
        self.system_fingerprint = self.system_fingerprint or chunk.get("system_fingerprint")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        answered = False
        for delta_choice in chunk.get("choices") or ():
            if not isinstance(delta_choice, dict):
                continue
            choice = self._choices.setdefault(int(delta_choice.get("index") or 0), _Choice())
            answered |= _apply_delta(choice, delta_choice.get("delta") or {})
            if delta_choice.get("finish_reason"):
                choice.finish_reason = delta_choice["finish_reason"]
        return answered

    def choices(self) -> list[tuple[JSON, str | None]]:
        """(message, finish_reason) per choice, by index."""
        return [
            (self._choices[index].message(), self._choices[index].finish_reason)
            for index in sorted(self._choices)
        ]


def _apply_delta(choice: _Choice, delta: JSON) -> bool:
    answered = False
    if delta.get("role"):
        choice.role = delta["role"]
    content = delta.get("content")
    if content is not None:
        choice.saw_content = True
        if content:
            choice.content.append(content)
            answered = True
    if delta.get("refusal"):
        choice.refusal.append(delta["refusal"])
        answered = True
    for call_delta in delta.get("tool_calls") or ():
        _apply_tool_call_delta(choice, call_delta)
        answered = True
    function_call = delta.get("function_call")
    if isinstance(function_call, dict):
        current = choice.function_call or {"name": "", "arguments": ""}
        current["name"] += function_call.get("name") or ""
        current["arguments"] += function_call.get("arguments") or ""
        choice.function_call = current
        answered = True
    return answered


def _apply_tool_call_delta(choice: _Choice, delta: JSON) -> None:
    index = int(delta.get("index") or 0)
    call = choice.tool_calls.get(index)
    if call is None:
        call = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        choice.tool_calls[index] = call
    if delta.get("id"):
        call["id"] = delta["id"]
    if delta.get("type"):
        call["type"] = delta["type"]
    function = delta.get("function") or {}
    if function.get("name"):
        call["function"]["name"] += function["name"]
    if function.get("arguments"):
        choice.arguments.setdefault(index, []).append(function["arguments"])
