"""Which conversation a request lands in, decided from its messages alone (no database)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from capture.chain import chain, continuation_key, match_form
from capture.chat import ChatExchange
from fake_upstream.responses import Answer

SYSTEM = {"role": "system", "content": "You are terse."}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def exchange(messages: list[Any], *, owner: str = "alice", stream: bool = False, **extra: Any):
    """A captured exchange answered by the fake model, and the assistant message it returned."""
    request = {"model": "gpt-4o-mini", "messages": messages, **extra}
    answer = Answer(request)
    record = ChatExchange(
        owner=owner,
        key_fingerprint=None,
        client_ip="127.0.0.1",
        user_agent=None,
        conversation_header=None,
        request=request,
        stream=stream,
        started_at=datetime.now(UTC).replace(tzinfo=None),
        status=200,
    )
    if stream:
        record.chunks = [(1.0, event) for event in answer.events(include_usage=True)]
    else:
        record.response_body = answer.completion()
    rows = record.rows()
    assert rows.completion is not None
    return rows.completion["conversation_id"], answer.message()


def test_a_continuation_joins_the_conversation_however_the_client_resends_the_answer() -> None:
    first = [SYSTEM, {"role": "user", "content": "hi"}]
    conversation, answer = exchange(first)
    # As returned (refusal null, annotations []), as a plain dict, as text parts.
    resent_forms = [
        answer,
        {"role": "assistant", "content": answer["content"]},
        {"role": "assistant", "content": [{"type": "text", "text": answer["content"]}]},
        {**answer, "audio": None, "function_call": None, "tool_calls": None},
    ]
    for resent in resent_forms:
        follow_up = [*first, resent, {"role": "user", "content": "and then?"}]
        assert exchange(follow_up)[0] == conversation
        assert exchange(follow_up, stream=True)[0] == conversation


def test_a_streamed_tool_call_answer_is_recognised_when_sent_back_with_its_result() -> None:
    first = [{"role": "user", "content": "weather in Paris?"}]
    conversation, answer = exchange(first, stream=True, tools=TOOLS)
    (call,) = answer["tool_calls"]
    resent = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{**call, "index": 0}],  # some clients echo the stream's index
    }
    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}
    assert exchange([*first, resent, result], tools=TOOLS)[0] == conversation


def test_the_same_words_from_two_callers_are_two_conversations() -> None:
    first = [{"role": "user", "content": "hi"}]
    alice, answer = exchange(first, owner="alice")
    bob, _ = exchange(first, owner="bob")
    assert alice != bob
    follow_up = [*first, answer, {"role": "user", "content": "more"}]
    assert exchange(follow_up, owner="bob")[0] == bob != alice


def test_a_different_first_exchange_is_a_different_conversation() -> None:
    a, _ = exchange([{"role": "user", "content": "hi"}])
    b, _ = exchange([{"role": "user", "content": "hello"}])
    edited_answer = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "something the model never said"},
        {"role": "user", "content": "go on"},
    ]
    assert len({a, b, exchange(edited_answer)[0]}) == 3


def test_an_error_without_history_is_a_conversation_of_its_own() -> None:
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    ids = set()
    for _ in range(2):
        record = ChatExchange(
            owner="alice",
            key_fingerprint=None,
            client_ip=None,
            user_agent=None,
            conversation_header=None,
            request=request,
            stream=False,
            started_at=datetime.now(UTC).replace(tzinfo=None),
            status=429,
            response_body=orjson.dumps({"error": {"message": "slow down", "type": "rate"}}),
        )
        rows = record.rows()
        assert rows.completion is not None
        assert rows.completion["conversation_id"] == record.id
        ids.add(record.id)
    assert len(ids) == 2


def test_match_form_keeps_what_identifies_a_message() -> None:
    assert match_form({"role": "user", "content": "x", "name": None}) == {
        "role": "user",
        "content": "x",
    }
    assert match_form({"role": "assistant", "content": "a"}) != match_form(
        {"role": "assistant", "content": "b"}
    )
    assert continuation_key([{"role": "user", "content": "only a question"}]) is None


values = st.none() | st.sampled_from(["", "hi", " "]) | st.lists(st.just("x"), max_size=1)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"])},
        optional={"content": values | st.text(max_size=5), "name": values, "refusal": values},
    ),
    max_size=5,
)


@given(sent=messages)
@settings(max_examples=300, deadline=None)
def test_the_key_from_the_chain_hashes_is_the_key_computed_whole(sent: list[Any]) -> None:
    """The writer hands ``continuation_key`` the hashes ``chain`` made, to take those of the
    messages that are their own match form: the key must be the one computed from scratch."""
    digests = [digest for digest, _, _ in chain(sent)]
    assert continuation_key(sent, digests) == continuation_key(sent)
