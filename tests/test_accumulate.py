from typing import Any

from capture.accumulate import StreamAccumulator


def _chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-test",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def test_content_fragments_join_into_one_message_with_its_finish_reason() -> None:
    accumulator = StreamAccumulator()
    assert not accumulator.add(_chunk({"role": "assistant", "content": ""}))
    assert accumulator.add(_chunk({"content": "Hel"}))
    assert accumulator.add(_chunk({"content": "lo 你好"}))
    accumulator.add(_chunk({}, finish="stop"))
    assert accumulator.choices() == [({"role": "assistant", "content": "Hello 你好"}, "stop")]
    assert accumulator.id == "chatcmpl-1" and accumulator.model == "gpt-test"


def test_tool_call_deltas_reassemble_by_index_into_complete_calls() -> None:
    accumulator = StreamAccumulator()
    accumulator.add(_chunk({"role": "assistant", "content": None}))
    accumulator.add(
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "weather", "arguments": ""},
                    }
                ]
            }
        )
    )
    accumulator.add(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}))
    accumulator.add(
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "time", "arguments": "{}"},
                    }
                ]
            }
        )
    )
    accumulator.add(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}))
    accumulator.add(_chunk({}, finish="tool_calls"))
    message, finish = accumulator.choices()[0]
    assert finish == "tool_calls"
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
    ]


def test_usage_chunk_with_no_choices_is_kept_and_several_choices_stay_apart() -> None:
    accumulator = StreamAccumulator()
    accumulator.add(_chunk({"content": "a"}, index=0))
    accumulator.add(_chunk({"content": "b"}, index=1))
    accumulator.add({"id": "chatcmpl-1", "choices": [], "usage": {"total_tokens": 7}})
    assert [m["content"] for m, _ in accumulator.choices()] == ["a", "b"]
    assert accumulator.usage == {"total_tokens": 7}


def test_a_refusal_is_kept_apart_from_content() -> None:
    accumulator = StreamAccumulator()
    accumulator.add(_chunk({"role": "assistant", "refusal": "I can't"}))
    accumulator.add(_chunk({"refusal": " help."}, finish="stop"))
    message, _ = accumulator.choices()[0]
    assert message == {"role": "assistant", "content": None, "refusal": "I can't help."}
