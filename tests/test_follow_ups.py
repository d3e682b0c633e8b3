"""A Responses loop chained by ``previous_response_id`` is one conversation in whatever order
its records are written: a follow-up written before the response it follows (another
replica's writer running behind) is moved under it when that response is written, on every
backend."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from capture.responses import ResponsesExchange
from storage.batch import write_batch
from storage.browse import Rebuilder
from storage.database import create_engine, ensure_database, migrate
from storage.schema import completions, conversations, messages
from tests.history_db import lock_waits

START = datetime(2026, 12, 2, 9, 0, 0)
CALL = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "ls", "arguments": "{}"}
THINK = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "look"}]}


def said(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{text}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


TURNS: list[tuple[str, str | None, list[Any], list[Any]]] = [
    ("resp_P", None, [{"role": "user", "content": "list files"}], [THINK, CALL]),
    (
        "resp_R",
        "resp_P",
        [{"type": "function_call_output", "call_id": "call_1", "output": "a b"}],
        [said("two files")],
    ),
    ("resp_Q", "resp_R", [{"role": "user", "content": "and hidden ones?"}], [said("none")]),
]


def turn(index: int) -> ResponsesExchange:
    response_id, previous, items, output = TURNS[index]
    request: dict[str, Any] = {"model": "gpt-5", "input": items}
    if previous:
        request["previous_response_id"] = previous
    body = {
        "id": response_id,
        "object": "response",
        "status": "completed",
        "model": "gpt-5",
        "output": output,
        "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
    }
    return ResponsesExchange(
        owner="ann",
        key_fingerprint=None,
        client_ip=None,
        user_agent=None,
        conversation_header=None,
        request=request,
        stream=False,
        started_at=START + timedelta(seconds=index),
        status=200,
        response_body=orjson.dumps(body),
        id=f"record-{index}",  # the same record, however often it is written
    )


async def _written_in(history_dsn: str, batches: list[list[int]]) -> dict[str, Any]:
    engine = create_engine(await ensure_database(history_dsn), pool_size=1)
    try:
        await migrate(engine, "history")
        for batch in batches:
            async with engine.begin() as connection:
                await write_batch(connection, [turn(i).rows() for i in batch])
        async with engine.connect() as connection:
            rows = list(
                (await connection.execute(select(completions).order_by(completions.c.started_at)))
                .mappings()
                .all()
            )
            rebuilder = Rebuilder(connection)
            await rebuilder.load(row["conversation_id"] for row in rows)
            stored = (await connection.execute(select(func.count()).select_from(messages))).scalar()
            kept = (await connection.execute(select(conversations))).mappings().all()
            return {
                "conversations": [row["conversation_id"] for row in rows],
                "requests": [rebuilder.request(row) for row in rows],
                "answers": [rebuilder.answer(row) for row in rows],
                "thread": rebuilder.chain(rows[-1]["conversation_id"], rows[-1]["response_hash"]),
                "messages": stored,
                "totals": [
                    (c["id"], c["completion_count"], c["message_count"], c["total_tokens"])
                    for c in kept
                ],
            }
    finally:
        await engine.dispose()


async def test_follow_ups_written_first_join_the_response_they_follow(history_dsn: str) -> None:
    # The last two turns are written first (one batch: the third finds the second in it),
    # then the first; then all of it again, as a replay would: nothing changes.
    early = await _written_in(history_dsn, [[1, 2], [0], [1, 2], [0]])
    first_id = early["conversations"][0]
    assert early["conversations"] == [first_id] * 3
    assert early["requests"] == [items for _, _, items, _ in TURNS]
    assert early["answers"] == [output for _, _, _, output in TURNS]
    assert early["thread"] == [item for _, _, items, output in TURNS for item in items + output]
    assert early["messages"] == 7  # every item once
    assert early["totals"] == [(first_id, 3, 7, 45)]


async def test_follow_ups_written_in_order_make_the_same_conversation(history_dsn: str) -> None:
    in_order = await _written_in(history_dsn, [[0], [1], [2]])
    assert len(set(in_order["conversations"])) == 1
    assert in_order["thread"] == [item for _, _, items, output in TURNS for item in items + output]
    assert in_order["messages"] == 7
    assert in_order["totals"][0][1:] == (3, 7, 45)


@pytest.mark.parametrize("first", ["follow-up", "response"])
async def test_a_follow_up_and_its_response_written_at_once_meet(
    history_dsn: str, first: str
) -> None:
    """Two writers, one with the follow-up, one with the response, in transactions that
    overlap: whichever commits first, the second sees it and moves the follow-up."""
    engine = create_engine(await ensure_database(history_dsn), pool_size=3)
    try:
        await migrate(engine, "history")
        batches = {"follow-up": [turn(1).rows()], "response": [turn(0).rows()]}
        second = "response" if first == "follow-up" else "follow-up"
        async with engine.connect() as one, engine.connect() as two:
            await one.begin()
            await write_batch(one, batches[first])
            await two.begin()
            waiting = asyncio.get_running_loop().create_task(write_batch(two, batches[second]))
            while not waiting.done() and await lock_waits(engine) == 0:
                await asyncio.sleep(0.01)  # until the second writer waits for the first
            await one.commit()
            await waiting
            await two.commit()
        async with engine.connect() as connection:
            rows = (await connection.execute(select(completions))).mappings().all()
            kept = (await connection.execute(select(conversations))).mappings().all()
        assert len({row["conversation_id"] for row in rows}) == 1
        assert [(c["completion_count"], c["message_count"]) for c in kept] == [(2, 5)]
    finally:
        await engine.dispose()
