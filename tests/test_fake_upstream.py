"""The fake upstream speaks OpenAI's wire format: its bodies validate against OpenAI's own
published OpenAPI schemas, and the SDK reads them as it reads OpenAI's."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.sse import iter_data
from tests.conftest import unavailable

SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.json"
TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}},
]


def nullable_as_json_schema(node: Any) -> Any:
    """OpenAI's document still marks nullable fields the OpenAPI 3.0 way (``nullable: true``);
    in JSON Schema 2020-12 that is ``null`` added to the allowed types."""
    if isinstance(node, list):
        return [nullable_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: nullable_as_json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def registry() -> Registry:
    document = nullable_as_json_schema(json.loads(SPEC.read_text()))
    return Registry().with_resource("urn:openai", Resource(document, DRAFT202012))


def validate(instance: Any, schema_name: str) -> None:
    if not SPEC.exists():
        unavailable(f"OpenAI's OpenAPI description is not at {SPEC}")
    schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema, registry=registry()).validate(instance)


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
