"""Messages stored already: a turn's resent history is not sent to the database again when
it is stored, and is sent in full when it is not, on every backend; and no completion is
left pointing at a message deleted while it was written."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from capture.chat import ChatExchange
from storage import deletion, history
from storage.schema import completions, conversations, messages
from storage.scope import Scope
from tests.conftest import database_dsn
from tests.history_db import migrated, write_records
from tests.test_message_store import exchange

ANSWER = {"role": "assistant", "content": "done"}  # what ``exchange`` records as the answer


def turns(count: int) -> list[ChatExchange]:
    """The records of a conversation ``count`` turns long, each resending the one before."""
    sent: list[Any] = [{"role": "system", "content": "Be brief."}]
    records = []
    for turn in range(count):
        sent = [*sent, {"role": "user", "content": f"question {turn}"}]
        records.append(exchange(sent))
        sent = [*sent, ANSWER]
    return records


async def rebuilt(engine: AsyncEngine, record: ChatExchange) -> list[Any]:
    async with engine.connect() as connection:
        row = (
            (await connection.execute(select(completions).where(completions.c.id == record.id)))
            .mappings()
            .one()
        )
        return await history.request_messages(connection, row)


async def stored(engine: AsyncEngine) -> tuple[int, int]:
    """Message rows, and the message count the conversation keeps."""
    async with engine.connect() as connection:
        rows = len((await connection.execute(select(messages.c.hash))).all())
        counted = await connection.scalar(select(conversations.c.message_count))
    return rows, int(counted or 0)


@contextmanager
def messages_sent(engine: AsyncEngine) -> Iterator[list[int]]:
    """How many message rows each statement inserting messages sends."""
    counts: list[int] = []

    def seen(_c: Any, _cur: Any, statement: str, parameters: Any, context: Any, _m: Any) -> None:
        if statement.upper().replace('"', "").startswith("INSERT INTO MESSAGES"):
            # SQLAlchemy's statements: a set of values a row (in one statement or many);
            # the PostgreSQL writer's own: one array of rows.
            rows = context.compiled_parameters if context.compiled is not None else parameters[0]
            counts.append(len(rows))

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        yield counts
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)


async def test_a_turn_whose_history_is_stored_sends_only_what_is_new(history_dsn: str) -> None:
    records = turns(4)
    async with migrated(history_dsn) as engine:
        with messages_sent(engine) as sent:
            for record in records:
                await write_records(engine, record)
        for record in records:
            assert await rebuilt(engine, record) == record.request["messages"]
        assert await stored(engine) == (9, 9)  # system, then a question and an answer a turn
    # The first turn: the system message, its question, its answer; then only the new two.
    assert sent == [3, 2, 2, 2]
    assert [record.rows().resent for record in records] == [0, 3, 5, 7]


async def test_history_that_is_gone_is_sent_again_in_full(history_dsn: str) -> None:
    """The first turn deleted (with the messages only it used), the second turn, resending
    them, stores them again; as does a turn whose history was never captured."""
    first, second, third = turns(3)
    async with migrated(history_dsn) as engine:
        await write_records(engine, first)
        async with engine.begin() as connection:
            await deletion.delete_completion(connection, Scope.of("alice"), first.id)
        assert await stored(engine) == (0, 0)
        await write_records(engine, second, third)  # one batch: the third's history is in it
        assert await rebuilt(engine, second) == second.request["messages"]
        assert await rebuilt(engine, third) == third.request["messages"]
        assert await stored(engine) == (7, 7)


async def test_a_turn_written_while_its_history_is_deleted_waits_and_keeps_it(
    history_dsn: str,
) -> None:
    """Deletion locks the conversation; the writer, finding the history stored, relies on
    it only under that lock, so it waits, then finds it gone and stores it in full."""
    first, second = turns(2)
    async with migrated(history_dsn) as engine:
        await write_records(engine, first)
        async with engine.connect() as deleter:
            async with deleter.begin():
                await deletion.delete_completion(deleter, Scope.of("alice"), first.id)
                writing = asyncio.create_task(write_records(engine, second))
                await asyncio.sleep(1.0)
                assert not writing.done()  # waiting for the conversation
            await asyncio.wait_for(writing, 30)
        assert await rebuilt(engine, second) == second.request["messages"]
        assert await stored(engine) == (5, 5)


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
async def test_a_first_request_asked_again_while_deleted_keeps_its_messages(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The same first request, answered the same, joins the conversation of the first and
    finds all its messages stored: nothing resent, so nothing looked up. A deletion of
    that conversation takes its lock, the writer writes, then the deletion (not seeing the
    writer's completion) deletes every message and commits: the writer, which found them
    stored, must store them again."""
    first = exchange([{"role": "user", "content": "hello"}])
    again = exchange([{"role": "user", "content": "hello"}])
    conversation_id = first.rows().conversation["id"]  # type: ignore[index]
    assert again.rows().conversation["id"] == conversation_id  # type: ignore[index]
    async with migrated(database_dsn(request, kind, tmp_path, "again")) as engine:
        await write_records(engine, first)
        async with engine.connect() as deleter:
            async with deleter.begin():
                await deleter.execute(
                    select(conversations.c.id)
                    .where(conversations.c.id == conversation_id)
                    .with_for_update()
                )
                writing = asyncio.create_task(write_records(engine, again))
                await asyncio.sleep(1.0)
                assert not writing.done()  # waiting for the conversation
                await deletion.delete_completion(deleter, Scope.of("alice"), first.id)
            await asyncio.wait_for(writing, 30)
        assert await rebuilt(engine, again) == again.request["messages"]
        assert await stored(engine) == (2, 2)
