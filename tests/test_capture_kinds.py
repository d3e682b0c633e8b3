"""What each captured API's record becomes, from the bytes the request path saw: Responses
(whole, streamed, cut short, failed), embeddings and legacy completions. Pure, no I/O."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import pytest

from capture.chain import ROOT
from capture.completions import CompletionsExchange
from capture.embeddings import EmbeddingsExchange, kept_answer
from capture.exchange import CLIENT_DISCONNECTED, UPSTREAM_DISCONNECTED, Exchange
from capture.message_rows import stored_message
from capture.responses import ResponsesExchange
from capture.rows import RowSet

JSON = dict[str, Any]
CALL = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"}
REASONING = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hm"}]}
SAID = {
    "type": "message",
    "id": "msg_1",
    "role": "assistant",
    "status": "completed",
    "content": [{"type": "output_text", "text": "Hello there", "annotations": []}],
}
USAGE = {
    "input_tokens": 11,
    "input_tokens_details": {"cached_tokens": 3},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 2},
    "total_tokens": 18,
}


def response(output: list[Any], status: str = "completed", **more: Any) -> JSON:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1_700_000_000,
        "model": "gpt-5-2025",
        "status": status,
        "output": output,
        "usage": USAGE,
        "error": None,
        "incomplete_details": None,
        **more,
    }


def record(kind: type[Exchange], request: JSON, **fields: Any) -> Exchange:
    return kind(
        owner="ann",
        key_fingerprint="fp",
        client_ip=None,
        user_agent=None,
        conversation_header=None,
        request=request,
        stream=request.get("stream") is True,
        started_at=datetime(2026, 12, 2, 12, 0, 0),
        status=200,
        **fields,
    )


def sse(*events: JSON) -> list[tuple[float, bytes]]:
    """Each event as OpenAI sends it (an ``event:`` line, then its data), 1 ms apart."""
    return [
        (float(at), b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n")
        for at, e in enumerate(events, start=1)
    ]


def messages(rows: RowSet) -> list[Any]:
    return [stored_message(row) for row in rows.messages]


def test_a_whole_responses_answer_is_its_input_items_then_its_output_items() -> None:
    request = {"model": "gpt-5", "input": "Say hello", "instructions": "Be brief", "store": False}
    rows = record(
        ResponsesExchange, request, response_body=orjson.dumps(response([REASONING, SAID]))
    ).rows()
    completion = rows.completion
    assert completion is not None
    assert messages(rows) == [{"role": "user", "content": "Say hello"}, REASONING, SAID]
    assert completion["call_type"] == "responses"
    assert completion["response_id"] == "resp_1" and completion["response_model"] == "gpt-5-2025"
    assert completion["finish_reason"] == "stop"
    assert (completion["prompt_tokens"], completion["completion_tokens"]) == (11, 7)
    assert (completion["cached_tokens"], completion["reasoning_tokens"]) == (3, 2)
    assert completion["request_message_count"] == 1
    assert completion["request_hash"] == rows.messages[0]["hash"]
    assert completion["response_hash"] == rows.messages[-1]["hash"]
    assert orjson.loads(completion["params"]) == {
        "model": "gpt-5",
        "instructions": "Be brief",
        "store": False,
    }
    assert rows.conversation is not None and rows.conversation["title"] == "Say hello"
    assert rows.messages[1]["role"] == "reasoning" and rows.messages[1]["content_text"] == "hm"


@pytest.mark.parametrize(
    ("status", "details", "error", "reason"),
    [
        ("incomplete", {"reason": "max_output_tokens"}, None, "max_output_tokens"),
        ("incomplete", {"reason": "content_filter"}, None, "content_filter"),
        ("failed", None, {"code": "server_error", "message": "boom"}, "failed"),
        ("cancelled", None, None, "cancelled"),
    ],
)
def test_a_responses_status_is_its_finish_reason(
    status: str, details: JSON | None, error: JSON | None, reason: str
) -> None:
    body = response([SAID], status, incomplete_details=details, error=error)
    completion = record(
        ResponsesExchange, {"model": "m", "input": "x"}, response_body=orjson.dumps(body)
    ).rows()
    assert completion.completion is not None
    assert completion.completion["finish_reason"] == reason
    if error:
        assert completion.completion["error_type"] == "server_error"
        assert completion.completion["error_message"] == "boom"


def _stream_events(terminal: str | None) -> list[JSON]:
    events: list[JSON] = [
        {"type": "response.created", "response": response([], "in_progress", usage=None)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**CALL, "arguments": ""},
        },
        {"type": "response.function_call_arguments.delta", "output_index": 0, "delta": '{"a"'},
        {"type": "response.function_call_arguments.delta", "output_index": 0, "delta": ":1}"},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {**CALL, "arguments": '{"a":1}'},
        },
        {
            "type": "response.output_item.added",
            "output_index": 1,
            "item": {**SAID, "status": "in_progress", "content": []},
        },
        {
            "type": "response.content_part.added",
            "output_index": 1,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
        {
            "type": "response.output_text.delta",
            "output_index": 1,
            "content_index": 0,
            "delta": "Hel",
        },
        {
            "type": "response.output_text.delta",
            "output_index": 1,
            "content_index": 0,
            "delta": "lo",
        },
    ]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    if terminal:
        whole = response([{**CALL, "arguments": '{"a":1}'}, SAID], terminal)
        events.append({"type": f"response.{terminal}", "response": whole, "sequence_number": 99})
    return events


def test_a_stream_is_recorded_from_its_terminal_event() -> None:
    exchange = record(
        ResponsesExchange,
        {"model": "m", "input": "x", "stream": True},
        chunks=sse(*_stream_events("completed")),
    )
    rows = exchange.rows()
    assert messages(rows)[1:] == [{**CALL, "arguments": '{"a":1}'}, SAID]
    assert rows.completion is not None
    assert rows.completion["finish_reason"] == "stop"
    assert rows.completion["ttft_ms"] == 3.0  # the first delta's arrival
    assert rows.completion["prompt_tokens"] == 11


@pytest.mark.parametrize("cut", [CLIENT_DISCONNECTED, UPSTREAM_DISCONNECTED])
def test_a_stream_cut_short_is_rebuilt_from_what_it_delivered(cut: str) -> None:
    exchange = record(
        ResponsesExchange,
        {"model": "m", "input": "x", "stream": True},
        chunks=sse(*_stream_events(None)),
        cut_short=cut,
    )
    rows = exchange.rows()
    call, said = messages(rows)[1:]
    assert call == {**CALL, "arguments": '{"a":1}'}  # done: kept as sent
    assert said["content"] == [{"type": "output_text", "text": "Hello", "annotations": []}]
    assert said["status"] == "incomplete"
    assert rows.completion is not None
    assert rows.completion["finish_reason"] == cut
    assert rows.completion["response_id"] == "resp_1"


def test_an_error_event_is_recorded_as_the_error() -> None:
    events = _stream_events(None) + [
        {
            "type": "error",
            "code": "server_error",
            "message": "overloaded",
            "param": None,
            "sequence_number": 9,
        }
    ]
    rows = record(
        ResponsesExchange, {"model": "m", "input": "x", "stream": True}, chunks=sse(*events)
    ).rows()
    assert rows.completion is not None
    assert rows.completion["finish_reason"] == "failed"
    assert (rows.completion["error_type"], rows.completion["error_message"]) == (
        "server_error",
        "overloaded",
    )


def test_an_event_split_at_every_byte_reads_the_same() -> None:
    whole = b"".join(raw for _, raw in sse(*_stream_events("completed")))
    expected = record(
        ResponsesExchange, {"model": "m", "input": "x", "stream": True}, chunks=[(1.0, whole)]
    ).rows()
    for cut in range(1, len(whole), 97):
        split = [(1.0, whole[:cut]), (2.0, whole[cut:])]
        rows = record(
            ResponsesExchange, {"model": "m", "input": "x", "stream": True}, chunks=split
        ).rows()
        assert messages(rows) == messages(expected)
        assert rows.completion is not None and rows.completion["finish_reason"] == "stop"


def test_a_follow_up_names_the_response_it_follows_and_moves_under_it() -> None:
    output = {"type": "function_call_output", "call_id": "call_1", "output": "42"}
    rows = record(
        ResponsesExchange,
        {"model": "m", "input": [output], "previous_response_id": "resp_0"},
        response_body=orjson.dumps(response([SAID])),
    ).rows()
    assert rows.follows == "resp_0"
    moved = rows.moved("conversation-of-resp_0", "tail-of-resp_0")
    assert {row["conversation_id"] for row in moved.messages} == {"conversation-of-resp_0"}
    assert moved.messages[0]["parent_hash"] == "tail-of-resp_0"
    assert moved.messages[1]["parent_hash"] == moved.messages[0]["hash"]
    assert moved.completion is not None and moved.conversation is not None
    assert moved.completion["request_hash"] == moved.messages[0]["hash"]
    assert moved.completion["response_hash"] == moved.messages[1]["hash"]
    assert moved.conversation["id"] == "conversation-of-resp_0"
    assert messages(moved) == messages(rows)  # what was said is untouched


def test_a_stateless_loop_that_resends_its_items_continues_one_conversation() -> None:
    ask = {"role": "user", "content": "weather?"}
    first = record(
        ResponsesExchange,
        {"model": "m", "input": [ask], "tools": [{"type": "function", "name": "f"}]},
        response_body=orjson.dumps(response([REASONING, CALL])),
    ).rows()
    output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    # The client sends the answer back without its reasoning, and the call without its id.
    resent = [ask, {k: v for k, v in CALL.items() if k != "id"}, output]
    second = record(
        ResponsesExchange,
        {"model": "m", "input": resent},
        response_body=orjson.dumps(response([SAID])),
    ).rows()
    assert first.conversation is not None and second.conversation is not None
    assert second.conversation["id"] == first.conversation["id"]
    assert second.resent == 2


def test_embeddings_keep_the_inputs_and_usage_never_the_vectors() -> None:
    vectors = [{"object": "embedding", "index": i, "embedding": [0.125] * 1536} for i in range(3)]
    body = orjson.dumps(
        {
            "object": "list",
            "data": vectors,
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 6, "total_tokens": 6},
        }
    )
    kept = kept_answer(200, body)
    assert len(kept) < 200 and b"0.125" not in kept
    assert orjson.loads(kept)["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    request = {"model": "text-embedding-3-small", "input": ["a", "b", [1, 2, 3]], "dimensions": 8}
    rows = record(EmbeddingsExchange, request, response_body=kept).rows()
    assert messages(rows) == [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "user", "content": None, "token_count": 3},
    ]
    completion = rows.completion
    assert completion is not None and completion["call_type"] == "embeddings"
    assert completion["request_message_count"] == 3 and completion["prompt_tokens"] == 6
    assert completion["response_model"] == "text-embedding-3-small"
    assert orjson.loads(completion["params"]) == {
        "model": "text-embedding-3-small",
        "dimensions": 8,
    }
    assert completion["conversation_id"] == completion["id"]  # a conversation of its own


@pytest.mark.parametrize("last_key", [True, False])
def test_kept_answer_finds_the_end_of_the_vectors_wherever_they_are(last_key: bool) -> None:
    data = [{"object": "embedding", "index": 0, "embedding": "AAAA" * 2000}]
    head = {"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    body = orjson.dumps({**head, "data": data} if last_key else {"data": data, **head})
    kept = orjson.loads(kept_answer(200, body))
    assert kept == {**head, "data": []}
    assert kept_answer(400, body) == body  # an error is kept whole


def test_legacy_completions_are_prompts_and_texts() -> None:
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [
            {"index": 0, "text": " world", "finish_reason": "length", "logprobs": None},
            {"index": 1, "text": " there", "finish_reason": "stop", "logprobs": None},
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    rows = record(
        CompletionsExchange,
        {"model": "gpt-3.5-turbo-instruct", "prompt": "hello", "n": 2},
        response_body=orjson.dumps(body),
    ).rows()
    assert messages(rows) == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": " world"},
    ]
    completion = rows.completion
    assert completion is not None
    assert completion["call_type"] == "completions" and completion["finish_reason"] == "length"
    assert orjson.loads(completion["extra_choices"])[0]["message"]["content"] == " there"
    assert completion["total_tokens"] == 3


def test_a_streamed_legacy_completion_joins_its_texts() -> None:
    chunks = [
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": "m",
            "choices": [{"index": 0, "text": t, "finish_reason": f}],
        }
        for t, f in (("Hel", None), ("lo", "stop"))
    ]
    raw = [(float(i), b"data: " + orjson.dumps(c) + b"\n\n") for i, c in enumerate(chunks)]
    rows = record(
        CompletionsExchange, {"model": "m", "prompt": "x", "stream": True}, chunks=raw
    ).rows()
    assert messages(rows)[1] == {"role": "assistant", "content": "Hello"}
    assert rows.completion is not None and rows.completion["finish_reason"] == "stop"


def test_items_the_gateway_has_never_seen_are_kept_as_json() -> None:
    odd = [
        {"type": "a_new_item_type", "payload": {"deep": [[[{"x": 1}]]]}},
        "a bare string",
        7,
        {"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]},
    ]
    rows = record(
        ResponsesExchange, {"model": "m", "input": odd}, response_body=b"not json at all"
    ).rows()
    assert messages(rows) == odd
    assert rows.messages[0]["parent_hash"] is None
    assert rows.messages[0]["hash"] != ROOT


def test_with_content_off_a_responses_record_keeps_its_shape_and_nothing_said() -> None:
    from capture.redaction import Redactor

    output = {"type": "function_call_output", "call_id": "call_1", "output": "secret result"}
    rows = record(
        ResponsesExchange,
        {"model": "m", "input": [{"role": "user", "content": "secret question"}, output]},
        response_body=orjson.dumps(response([REASONING, {**CALL, "arguments": '{"pin":1234}'}])),
    ).rows()
    kept = Redactor((), capture_content=False).rows(rows)
    stored = messages(kept)
    assert "secret" not in orjson.dumps(stored).decode() and "1234" not in str(stored)
    assert stored[1] == {"type": "function_call_output", "call_id": "call_1", "content": None}
    assert stored[3] == {
        "type": "function_call",
        "name": "f",
        "call_id": "call_1",
        "content": None,
    }
    assert kept.conversation is not None and kept.conversation["title"] is None


def test_with_content_off_no_parameter_keeps_what_was_said() -> None:
    from capture.redaction import Redactor

    request = {
        "model": "m",
        "input": "hi",
        "instructions": "secret system prompt",
        "prompt": {"id": "pmpt_1", "version": "2", "variables": {"name": "secret name"}},
    }
    rows = record(ResponsesExchange, request, response_body=orjson.dumps(response([SAID]))).rows()
    kept = Redactor((), capture_content=False).rows(rows)
    assert kept.completion is not None
    params = orjson.loads(kept.completion["params"])
    assert params == {"model": "m", "prompt": {"id": "pmpt_1", "version": "2"}}
    legacy = record(
        CompletionsExchange,
        {"model": "m", "prompt": "secret start", "suffix": "secret end"},
        response_body=b"{}",
    ).rows()
    kept = Redactor((), capture_content=False).rows(legacy)
    assert kept.completion is not None and "secret" not in kept.completion["params"]


def test_with_content_off_items_that_are_not_objects_are_kept_as_nothing() -> None:
    from capture.redaction import Redactor

    rows = record(
        ResponsesExchange, {"model": "m", "input": [1, "secret", None]}, response_body=b"{}"
    ).rows()
    kept = Redactor((), capture_content=False).rows(rows)
    assert [orjson.loads(row["body"]) for row in kept.messages] == [{"content": None}] * 3
