"""The fake upstream speaks OpenAI's wire format: its bodies validate against OpenAI's own
published OpenAPI schemas, and the SDK reads them as it reads OpenAI's."""

from __future__ import annotations

import array
import base64
import json
import math
import time
from typing import Any

import httpx
import openai
import openai.types.responses as rtypes
import pytest

from capture.sse import iter_data
from fake_upstream.responses_api import ResponseAnswer, ResponseStore
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


# The Responses API: bodies and stream events against OpenAI's schemas and the SDK's types.

RESPONSE_TOOLS: list[Any] = [
    {"type": "function", "name": "f", "parameters": {"type": "object"}},
    {"type": "function", "name": "g", "description": "G.", "parameters": {"type": "object"}},
]
REASONING: Any = {"effort": "low", "summary": "auto"}
NULL_SENT = ("usage", "user")  # nulls OpenAI sends that its schema does not allow
EVENT_TYPES: dict[str, tuple[str, type[Any]]] = {
    "response.created": ("ResponseCreatedEvent", rtypes.ResponseCreatedEvent),
    "response.in_progress": ("ResponseInProgressEvent", rtypes.ResponseInProgressEvent),
    "response.output_item.added": (
        "ResponseOutputItemAddedEvent",
        rtypes.ResponseOutputItemAddedEvent,
    ),
    "response.output_item.done": (
        "ResponseOutputItemDoneEvent",
        rtypes.ResponseOutputItemDoneEvent,
    ),
    "response.content_part.added": (
        "ResponseContentPartAddedEvent",
        rtypes.ResponseContentPartAddedEvent,
    ),
    "response.content_part.done": (
        "ResponseContentPartDoneEvent",
        rtypes.ResponseContentPartDoneEvent,
    ),
    "response.output_text.delta": ("ResponseTextDeltaEvent", rtypes.ResponseTextDeltaEvent),
    "response.output_text.done": ("ResponseTextDoneEvent", rtypes.ResponseTextDoneEvent),
    "response.function_call_arguments.delta": (
        "ResponseFunctionCallArgumentsDeltaEvent",
        rtypes.ResponseFunctionCallArgumentsDeltaEvent,
    ),
    "response.function_call_arguments.done": (
        "ResponseFunctionCallArgumentsDoneEvent",
        rtypes.ResponseFunctionCallArgumentsDoneEvent,
    ),
    "response.reasoning_summary_part.added": (
        "ResponseReasoningSummaryPartAddedEvent",
        rtypes.ResponseReasoningSummaryPartAddedEvent,
    ),
    "response.reasoning_summary_part.done": (
        "ResponseReasoningSummaryPartDoneEvent",
        rtypes.ResponseReasoningSummaryPartDoneEvent,
    ),
    "response.reasoning_summary_text.delta": (
        "ResponseReasoningSummaryTextDeltaEvent",
        rtypes.ResponseReasoningSummaryTextDeltaEvent,
    ),
    "response.reasoning_summary_text.done": (
        "ResponseReasoningSummaryTextDoneEvent",
        rtypes.ResponseReasoningSummaryTextDoneEvent,
    ),
    "response.completed": ("ResponseCompletedEvent", rtypes.ResponseCompletedEvent),
    "response.incomplete": ("ResponseIncompleteEvent", rtypes.ResponseIncompleteEvent),
    "response.failed": ("ResponseFailedEvent", rtypes.ResponseFailedEvent),
    "error": ("ResponseErrorEvent", rtypes.ResponseErrorEvent),
}


def sdk(upstream: Any, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=upstream.base_url, api_key="sk-test", default_headers=headers, max_retries=0
    )


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Each event of a Responses stream: its ``event:`` name and its data."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(lines) == {"event", "data"}, block
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def checked_stream(upstream: Any, body: dict[str, Any], **headers: str) -> list[dict[str, Any]]:
    """The data of each event of the streamed answer to ``body``, each checked against
    OpenAI's schema of its type and parsed strictly by the SDK's type for it."""
    answer = httpx.post(
        upstream.base_url + "/responses", json={**body, "stream": True}, headers=headers
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert b"[DONE]" not in answer.content
    events = sse_events(answer.content)
    for number, (name, data) in enumerate(events):
        assert data["type"] == name and data["sequence_number"] == number
        schema, sdk_type = EVENT_TYPES[name]
        if "response" in data:
            validate({**data, "response": openai_shaped(data["response"])}, schema)
        else:
            validate(data, schema)
        sdk_type.model_validate(data)
    return [data for _, data in events]


def openai_shaped(response: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sends ``"usage": null`` until a response is done and ``"user": null`` when no
    user was given (its own examples show both), while its schema has no null for either:
    a response is checked against the schema without them."""
    return {k: v for k, v in response.items() if v is not None or k not in NULL_SENT}


def checked_response(body: dict[str, Any]) -> rtypes.Response:
    validate(openai_shaped(body), "Response")
    return rtypes.Response.model_validate(body)


def without_ids(value: Any) -> Any:
    """``value`` with the ids that differ from one call to the next blanked."""
    if isinstance(value, list):
        return [without_ids(item) for item in value]
    if isinstance(value, dict):
        return {k: "" if k in ("id", "item_id") else without_ids(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tools": RESPONSE_TOOLS},
        {"tools": RESPONSE_TOOLS, "reasoning": REASONING},
        {"model": "o3-mini", "instructions": "Be brief.", "temperature": 0.2},
    ],
    ids=["text", "tools", "tools+reasoning", "o-series"],
)
def test_responses_and_their_streams_validate_and_agree(
    upstream: Any, extra: dict[str, Any]
) -> None:
    body = {"model": "gpt-4o", "input": "hi there", **extra}
    answer = httpx.post(upstream.base_url + "/responses", json=body)
    assert answer.status_code == 200
    whole = answer.json()
    parsed = checked_response(whole)
    assert whole["id"].startswith("resp_") and whole["object"] == "response"
    assert whole["status"] == "completed" and whole["error"] is None
    assert whole["incomplete_details"] is None and whole["model"].endswith("-2024-08-06")
    assert parsed.usage is not None
    usage = parsed.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    events = checked_stream(upstream, body)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["usage"] is None
    )
    assert events[-1]["type"] == "response.completed"
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] != whole["id"]  # unique per call
    assert without_ids(final) == without_ids(whole)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]


def test_the_sdk_reads_a_text_response_and_its_echoed_settings(upstream: Any) -> None:
    client = sdk(upstream)
    response = client.responses.create(
        model="gpt-4o",
        input="hello",
        instructions="Answer kindly.",
        metadata={"k": "v"},
        max_output_tokens=500,
        store=True,
    )
    assert response.output_text.startswith("Echo: hello")
    message = response.output[0]
    assert isinstance(message, rtypes.ResponseOutputMessage)
    assert message.id.startswith("msg_") and message.status == "completed"
    assert message.role == "assistant" and message.content[0].type == "output_text"
    assert message.content[0].annotations == []
    assert response.instructions == "Answer kindly." and response.metadata == {"k": "v"}
    assert response.max_output_tokens == 500 and response.to_dict()["store"] is True
    assert response.tool_choice == "auto" and response.tools == []
    assert response.temperature == 1.0 and response.top_p == 1.0
    assert response.parallel_tool_calls is True and response.truncation == "disabled"
    assert response.to_dict()["text"] == {"format": {"type": "text"}, "verbosity": "medium"}
    assert response.previous_response_id is None and response.reasoning is not None
    assert response.usage is not None and response.usage.output_tokens == 8
    assert response.usage.output_tokens_details.reasoning_tokens == 0


def test_the_sdk_iterates_typed_stream_events_and_they_add_up(upstream: Any) -> None:
    client = sdk(upstream, **{"X-Fake-Chunks": "5"})
    events = list(client.responses.create(model="gpt-4o", input="stream", stream=True))
    assert isinstance(events[0], rtypes.ResponseCreatedEvent)
    assert isinstance(events[-1], rtypes.ResponseCompletedEvent)
    deltas = [e for e in events if isinstance(e, rtypes.ResponseTextDeltaEvent)]
    assert len(deltas) == 5 and all(d.logprobs == [] for d in deltas)
    assert "".join(d.delta for d in deltas) == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    names = [e.type for e in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_the_sdks_stream_helper_gets_the_final_response(upstream: Any) -> None:
    client = sdk(upstream)
    with client.responses.stream(model="gpt-4o", input="helper") as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == snapshots[-1]
    assert final.output_text == client.responses.create(model="gpt-4o", input="helper").output_text


def test_a_function_call_stream_with_reasoning(upstream: Any) -> None:
    client = sdk(upstream)
    request: dict[str, Any] = {
        "model": "gpt-5",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "call both"}]}],
        "tools": RESPONSE_TOOLS,
        "reasoning": REASONING,
    }
    with client.responses.stream(**request) as stream:
        names = [event.type for event in stream]
        final = stream.get_final_response()
    reasoning, *calls = final.output
    assert isinstance(reasoning, rtypes.ResponseReasoningItem) and reasoning.id.startswith("rs_")
    assert reasoning.summary and reasoning.summary[0].type == "summary_text"
    assert [c.type for c in calls] == ["function_call", "function_call"]
    for call, tool in zip(calls, RESPONSE_TOOLS, strict=True):
        assert isinstance(call, rtypes.ResponseFunctionToolCall)
        assert call.id is not None and call.id.startswith("fc_")
        assert call.call_id.startswith("call_") and call.name == tool["name"]
        assert call.status == "completed" and isinstance(json.loads(call.arguments), dict)
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens > 0
    summary = [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        *["response.reasoning_summary_text.delta"] * 4,
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
    ]
    calling = [
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert names == [
        "response.created",
        "response.in_progress",
        *summary,
        *calling,
        *calling,
        "response.completed",
    ]
    whole = client.responses.create(**request)
    assert [(c.call_id, c.arguments) for c in whole.output if c.type == "function_call"] == [
        (c.call_id, c.arguments) for c in final.output if c.type == "function_call"
    ]


def test_the_turn_after_the_function_call_is_a_message(upstream: Any) -> None:
    client = sdk(upstream)
    first = client.responses.create(model="gpt-4o", input="weather?", tools=RESPONSE_TOOLS[:1])
    call = first.output[0]
    assert isinstance(call, rtypes.ResponseFunctionToolCall)
    second = client.responses.create(
        model="gpt-4o",
        previous_response_id=first.id,
        tools=RESPONSE_TOOLS[:1],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert second.output[0].type == "message" and second.output_text.startswith("Echo: weather?")
    assert second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.total_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-4o", input="x", previous_response_id="resp_nothing")
    assert refused.value.code == "previous_response_not_found"


def test_incomplete_responses(upstream: Any) -> None:
    headers = {"X-Fake-Response-Status": "incomplete"}
    client = sdk(upstream, **headers)
    response = client.responses.create(model="gpt-4o", input="cut")
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert response.output_text == "Echo: cut 你好,世界! word0"
    events = checked_stream(upstream, {"model": "gpt-4o", "input": "cut"}, **headers)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert len([e for e in events if e["type"] == "response.output_text.delta"]) == 4
    limited = sdk(upstream).responses.create(
        model="o3", input="long", max_output_tokens=20, reasoning={"effort": "high"}
    )
    assert limited.status == "incomplete" and limited.usage is not None
    assert limited.usage.output_tokens <= 20


def test_failed_responses(upstream: Any) -> None:
    headers = {"X-Fake-Response-Status": "failed"}
    response = sdk(upstream, **headers).responses.create(model="gpt-4o", input="fail")
    assert response.status == "failed" and response.error is not None
    assert response.error.code == "server_error" and response.error.message
    assert response.output == [] and response.usage is None
    events = checked_stream(upstream, {"model": "gpt-4o", "input": "fail"}, **headers)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert len([e for e in events if e["type"] == "response.output_text.delta"]) == 2


def test_an_error_event_ends_the_stream(upstream: Any) -> None:
    headers = {"X-Fake-Stream-Error": "1"}
    events = checked_stream(upstream, {"model": "gpt-4o", "input": "break"}, **headers)
    assert events[-1] == {
        "type": "error",
        "sequence_number": len(events) - 1,
        "code": "server_error",
        "message": events[-1]["message"],
        "param": None,
    }
    assert [e["type"] for e in events[-3:-1]] == ["response.output_text.delta"] * 2
    typed = list(
        sdk(upstream, **headers).responses.create(model="gpt-4o", input="break", stream=True)
    )
    assert isinstance(typed[-1], rtypes.ResponseErrorEvent) and typed[-1].code == "server_error"
    stored = sdk(upstream).responses.retrieve(events[0]["response"]["id"])
    assert stored.status == "failed"


def test_responses_streams_break_and_wait_as_chat_streams_do(upstream: Any) -> None:
    started = time.monotonic()
    slow = httpx.post(
        upstream.base_url + "/responses",
        json={"model": "m", "input": "x", "stream": True},
        headers={"X-Fake-Chunks": "2", "X-Fake-Chunk-Delay": "0.05"},
    )
    assert len(sse_events(slow.content)) == 10 and time.monotonic() - started >= 0.45
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream(
            "POST",
            upstream.base_url + "/responses",
            json={"model": "m", "input": "x", "stream": True},
            headers={"X-Fake-Reset-After": "3"},
        ) as response:
            response.read()
    refused = httpx.post(
        upstream.base_url + "/responses",
        json={"model": "m", "input": "x"},
        headers={"X-Fake-Status": "429"},
    )
    assert refused.status_code == 429
    validate(refused.json(), "ErrorResponse")


@pytest.mark.parametrize(
    ("settings", "called"),
    [
        ({}, ["f", "g"]),
        ({"parallel_tool_calls": False}, ["f"]),
        ({"tool_choice": {"type": "function", "name": "g"}}, ["g"]),
        ({"tool_choice": "none"}, []),
    ],
)
def test_which_functions_the_fake_model_calls(settings: dict[str, Any], called: list[str]) -> None:
    answer = ResponseStore().create(
        {"model": "gpt-4o", "input": "go", "tools": RESPONSE_TOOLS, **settings}
    )
    assert isinstance(answer, ResponseAnswer)
    output = answer.body()["output"]
    assert [item["name"] for item in output if item["type"] == "function_call"] == called
    assert [item["type"] for item in output] == (
        ["message"] if not called else ["function_call"] * len(called)
    )


def test_the_store_keeps_the_last_responses_only() -> None:
    store = ResponseStore(capacity=3)
    answers = [store.create({"model": "m", "input": f"n{n}"}) for n in range(5)]
    ids = [a.id for a in answers if isinstance(a, ResponseAnswer)]
    assert len(set(ids)) == 5 and len(store) == 3
    assert store.resource("GET", ids[1], b"")[0] == 404
    assert store.resource("GET", ids[4], b"")[0] == 200


def test_stored_responses_are_retrieved_listed_and_deleted(upstream: Any) -> None:
    client = sdk(upstream)
    items: list[Any] = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "look"}]},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}],
        },
        {"role": "assistant", "content": "I looked."},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "ok"},
    ]
    created = client.responses.create(model="gpt-4o", input=items, reasoning=REASONING)
    assert client.responses.retrieve(created.id) == created
    raw = httpx.get(upstream.base_url + f"/responses/{created.id}/input_items").json()
    validate(raw, "ResponseItemList")
    assert [item["type"] for item in raw["data"]] == [
        "function_call_output",
        "function_call",
        "message",
        "message",
        "message",
        "message",
    ]  # newest first, as OpenAI lists them unless told otherwise
    assert raw["first_id"] == raw["data"][0]["id"] and raw["last_id"] == raw["data"][-1]["id"]
    assert raw["has_more"] is False
    listed = list(client.responses.input_items.list(created.id, order="asc", limit=2))
    assert [item.id for item in listed] == [item["id"] for item in reversed(raw["data"])]
    assert len({item.id for item in listed}) == 6
    developer, user, image, assistant, call, output = listed
    assert isinstance(developer, rtypes.ResponseInputMessageItem)
    assert developer.role == "developer" and developer.content[0].type == "input_text"
    assert isinstance(image, rtypes.ResponseInputMessageItem)
    assert image.content[0].type == "input_image"
    assert isinstance(assistant, rtypes.ResponseOutputMessage)
    assert isinstance(call, rtypes.ResponseFunctionToolCallItem) and call.id.startswith("fc_")
    assert isinstance(output, rtypes.ResponseFunctionToolCallOutputItem)
    assert output.id.startswith("fco_") and output.call_id == "call_1"

    deleted = httpx.delete(upstream.base_url + f"/responses/{created.id}")
    assert deleted.json() == {"id": created.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(created.id)
    validate(gone.value.response.json(), "ErrorResponse")
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    unstored = client.responses.create(model="gpt-4o", input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(unstored.id)


def test_only_background_responses_in_progress_are_cancelled(upstream: Any) -> None:
    client = sdk(upstream)
    foreground = client.responses.create(model="gpt-4o", input="sync")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(foreground.id)
    slow = sdk(upstream, **{"X-Fake-Chunk-Delay": "30"})
    queued = slow.responses.create(model="gpt-4o", input="later", background=True)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    checked_response(httpx.get(upstream.base_url + f"/responses/{queued.id}").json())
    assert client.responses.retrieve(queued.id).status == "in_progress"
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # idempotent
    assert client.responses.retrieve(queued.id).status == "cancelled"
    done = client.responses.create(model="gpt-4o", input="soon", background=True)
    assert client.responses.retrieve(done.id).output_text.startswith("Echo: soon")
    assert client.responses.cancel(done.id).status == "completed"


# Embeddings and the legacy completions.


@pytest.mark.parametrize(
    ("given", "count"),
    [("one", 1), (["one", "two"], 2), ([1, 2, 3], 1), ([[1, 2], [3]], 2)],
    ids=["string", "strings", "tokens", "token-lists"],
)
def test_embeddings_of_each_kind_of_input(upstream: Any, given: Any, count: int) -> None:
    body = {"model": "text-embedding-3-small", "input": given}
    floats = httpx.post(upstream.base_url + "/embeddings", json=body).json()
    validate(floats, "CreateEmbeddingResponse")
    assert [d["index"] for d in floats["data"]] == list(range(count))
    assert all(len(d["embedding"]) == 1536 for d in floats["data"])
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0
    packed = httpx.post(
        upstream.base_url + "/embeddings", json={**body, "encoding_format": "base64"}
    ).json()
    for plain, encoded in zip(floats["data"], packed["data"], strict=True):
        assert (
            array.array("f", base64.b64decode(encoded["embedding"])).tolist()
            == (plain["embedding"])
        )
        assert math.isclose(math.fsum(x * x for x in plain["embedding"]), 1.0, rel_tol=1e-5)


def test_the_sdk_reads_embeddings_in_either_encoding(upstream: Any) -> None:
    client = sdk(upstream)
    request: dict[str, Any] = {"model": "text-embedding-3-large", "input": ["a", "b"]}
    decoded = client.embeddings.create(**request, dimensions=256)  # the SDK asks for base64
    floats = client.embeddings.create(**request, dimensions=256, encoding_format="float")
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    assert len(floats.data[0].embedding) == 256 and floats.data[0] != floats.data[1]
    assert len(client.embeddings.create(**request).data[0].embedding) == 3072
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="text-embedding-ada-002", input="a", dimensions=8)


def test_legacy_completions_streamed_and_not(upstream: Any) -> None:
    body: dict[str, Any] = {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "n": 2}
    whole = httpx.post(upstream.base_url + "/completions", json=body).json()
    validate(whole, "CreateCompletionResponse")
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert [c["finish_reason"] for c in whole["choices"]] == ["stop"] * 4
    short = httpx.post(upstream.base_url + "/completions", json={**body, "max_tokens": 2}).json()
    assert [c["finish_reason"] for c in short["choices"]] == ["length"] * 4
    assert short["usage"]["completion_tokens"] == 2 * 4
    streamed = httpx.post(
        upstream.base_url + "/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = list(iter_data([streamed.content]))
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    finishing = [chunk for chunk in chunks[:-1] if chunk["choices"][0]["finish_reason"]]
    assert len(finishing) == 4 and all(c["choices"][0]["text"] == "" for c in finishing)
    for chunk in chunks[:-1]:
        assert chunk["usage"] is None and len(chunk["choices"]) == 1
        assert chunk.keys() == finishing[0].keys()
        assert chunk["choices"][0].keys() == finishing[0]["choices"][0].keys()
    # The chunks before them say "finish_reason": null and all "usage": null, as OpenAI's do,
    # where its schema ("the same shape" as the whole completion) has no null for either.
    for chunk in finishing:
        validate({k: v for k, v in chunk.items() if k != "usage"}, "CreateCompletionResponse")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    validate(chunks[-1], "CreateCompletionResponse")
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        choice = chunk["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}


def test_the_sdk_reads_legacy_completions(upstream: Any) -> None:
    client = sdk(upstream)
    whole = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="once upon")
    assert whole.choices[0].text.startswith("Echo: once upon")
    assert whole.choices[0].finish_reason == "stop"
    text = ""
    for chunk in client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="once upon", stream=True
    ):
        assert chunk.object == "text_completion" and chunk.usage is None
        text += chunk.choices[0].text
    assert text == whole.choices[0].text
