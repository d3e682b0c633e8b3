"""The fake upstream speaks OpenAI's wire format: its bodies validate against OpenAI's own
published OpenAPI schemas, and the SDK reads them as it reads OpenAI's."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from capture.sse import iter_data
from tests.openai_schema import validate

TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}},
]


@pytest.mark.parametrize("tools", [False, True])
def test_completions_and_stream_chunks_validate_against_openais_schemas(
    upstream: Any, tools: bool
) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if tools:
        body["tools"] = TOOLS
    validate(
        httpx.post(upstream.base_url + "/chat/completions", json=body).json(),
        "CreateChatCompletionResponse",
    )
    streamed = httpx.post(
        upstream.base_url + "/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = list(iter_data([streamed.content]))
    assert events[-1] == b"[DONE]"
    for data in events[:-1]:
        validate(json.loads(data), "CreateChatCompletionStreamResponse")


def test_errors_validate_against_openais_error_schema(upstream: Any) -> None:
    response = httpx.post(
        upstream.base_url + "/chat/completions",
        json={"model": "m", "messages": []},
        headers={"X-Fake-Status": "429"},
    )
    assert response.status_code == 429
    validate(response.json(), "ErrorResponse")


def test_streamed_tool_calls_reassemble_to_the_non_streamed_ones(upstream: Any) -> None:
    client = openai.OpenAI(base_url=upstream.base_url, api_key="sk-test")
    request: dict[str, Any] = {
        "model": "gpt-4o",
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "call both"}],
    }
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    for chunk in client.chat.completions.create(**request, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert whole is not None and len(whole) == 2
    assert [calls[i] for i in sorted(calls)] == [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in whole
    ]


def test_a_reset_mid_stream_breaks_the_clients_read(upstream: Any) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream(
            "POST",
            upstream.base_url + "/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            headers={"X-Fake-Reset-After": "2"},
        ) as response:
            response.read()
