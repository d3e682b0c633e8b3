"""The message store on every backend: whatever a client sends comes back exactly."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from capture.chat import ChatExchange
from capture.codec import from_entry, to_entry
from storage import history
from storage.batch import write_batch
from storage.database import create_engine, ensure_database, migrate
from storage.dsn import parse_dsn
from storage.schema import completions, conversations, messages
from tests.conftest import database_dsn
from tests.dbservers import DatabaseServer


def exchange(sent: list[Any], **extra: Any) -> ChatExchange:
    return ChatExchange(
        owner="alice",
        key_fingerprint=None,
        client_ip=None,
        user_agent=None,
        conversation_header=None,
        request={"model": "m", "messages": sent, **extra},
        stream=False,
        started_at=datetime.now(UTC).replace(tzinfo=None),
        status=200,
        response_body=b'{"choices": [{"message": {"role": "assistant", "content": "done"}}]}',
    )


async def store_and_rebuild(history_dsn: str, record: ChatExchange) -> list[Any]:
    engine = create_engine(await ensure_database(history_dsn), pool_size=1)
    try:
        await migrate(engine, "history")
        async with engine.begin() as connection:
            await write_batch(connection, [record.rows()])
        async with engine.connect() as connection:
            row = (await connection.execute(select(completions))).mappings().one()
            return await history.request_messages(connection, row)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("spooled", [False, True])
async def test_nul_and_odd_characters_in_any_field_are_stored_and_rebuilt_exactly(
    history_dsn: str, spooled: bool
) -> None:
    """PostgreSQL's text cannot hold NUL; a client may send one anyway. The writer reads
    records back from the spool, where an entry tells whether any field holds one."""
    sent = [
        {"role": "system", "content": "nul \x00 here", "name": "a\x00b"},
        {"role": "user", "content": [{"type": "text", "text": "parts \x00 too 🎉 \u2028"}]},
        {"role": "user", "content": "emoji 🎉, RTL \u202e, lone surrogate-free 𝄞"},
    ]
    record = exchange(sent, user="end\x00user")
    record.user_agent = "agent\x00x"
    if spooled:
        record = from_entry(to_entry(record))
    assert await store_and_rebuild(history_dsn, record) == sent


@pytest.mark.parametrize(
    "where",
    ["", "content", "name", "user", "user_agent", "response", "escaped in the response"],
)
def test_a_spooled_record_is_nul_free_only_when_no_field_holds_a_nul(where: str) -> None:
    record = exchange([{"role": "user", "content": "hi \x00" if where == "content" else "hi"}])
    if where == "name":
        record.request["messages"][0]["name"] = "a\x00b"
    if where == "user":
        record.request["user"] = "end\x00user"
    if where == "user_agent":
        record.user_agent = "agent\x00"
    if where == "response":
        record.response_body = b'{"choices": []}\x00'
    if where == "escaped in the response":
        record.response_body = b'{"choices": [{"message": {"content": "a\\u0000b"}}]}'
    read_back = from_entry(to_entry(record))
    assert isinstance(read_back, ChatExchange)
    assert read_back.nul_free is (where == "")
    assert read_back.rows().nul_free is (where == "")


async def test_a_request_of_thousands_of_messages_rebuilds_on_every_backend(
    history_dsn: str,
) -> None:
    """An agent loop's request can hold thousands of messages: the walk up the chain must
    not stop at a database's default recursion limit (MariaDB's and MySQL's are 1,000)."""
    sent = [{"role": "user", "content": f"step {i}"} for i in range(3000)]
    assert await store_and_rebuild(history_dsn, exchange(sent)) == sent


async def test_a_batch_written_again_changes_nothing(history_dsn: str) -> None:
    """A replay (a retry after a lost commit, or two writers): nothing is stored twice, no
    total counts twice, and a batch that is all replays writes nothing at all."""
    first = exchange([{"role": "user", "content": "hello"}], user="u")
    second = exchange(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "done"},
            {"role": "user", "content": "more"},
        ]
    )
    engine = create_engine(await ensure_database(history_dsn), pool_size=1)
    try:
        await migrate(engine, "history")
        async with engine.begin() as connection:
            assert await write_batch(connection, [first.rows()]) == 1
        async with engine.begin() as connection:
            assert await write_batch(connection, [first.rows()]) == 0
        async with engine.begin() as connection:
            assert await write_batch(connection, [first.rows(), second.rows()]) == 1
        async with engine.connect() as connection:
            (conversation,) = (await connection.execute(select(conversations))).mappings()
            stored = await connection.scalar(select(func.count()).select_from(messages))
    finally:
        await engine.dispose()
    # One conversation, the second turn resending the first: hello, done, more, done.
    assert stored == 4
    assert (conversation["completion_count"], conversation["message_count"]) == (2, 4)


async def test_long_content_is_compressed_with_lz4_on_postgresql(
    postgres: DatabaseServer, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """pglz, PostgreSQL's default, cost the database most of a record's time once prompts
    are long (over ~2 KB a value is compressed as it is stored): what was said is
    compressed with LZ4, and reads back the same."""
    words = " ".join(f"word{i % 997}" for i in range(4000))  # ~36 KB, compressible
    sent = [
        {"role": "user", "content": [{"type": "text", "text": words}]},
        {"role": "user", "content": words},
    ]
    dsn = database_dsn(request, "postgresql", tmp_path, "lz4")
    assert await store_and_rebuild(dsn, exchange(sent)) == sent
    engine = create_engine(parse_dsn(dsn), pool_size=1)
    try:
        async with engine.connect() as connection:
            methods = await connection.execute(
                text(
                    "SELECT pg_column_compression(body), pg_column_compression(content_text) "
                    "FROM messages WHERE length(body) + coalesce(length(content_text), 0) > 30000"
                )
            )
            stored = {tuple(row) for row in methods}
    finally:
        await engine.dispose()
    # A string's text is kept once, in content_text; the parts' in their body too.
    assert stored == {(None, "lz4"), ("lz4", "lz4")}, stored


def test_a_conversation_is_titled_by_the_first_words_of_its_first_user_message() -> None:
    def title(content: str, *more: str) -> str | None:
        sent = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
        sent += [{"role": "user", "content": text} for text in more]
        conversation = exchange(sent).rows().conversation
        assert conversation is not None
        return conversation["title"]

    assert title("  plan a\n\ttrip  ") == "plan a trip"
    words = " ".join(f"word{n}" for n in range(40_000))  # a prompt of ~300 KB
    assert title(words.replace(" ", " \n ")) == words[:79] + "…"
    # Whitespace enough to hide the first words from a look at the head alone.
    assert title(" " * 5_000 + "late start " * 3) == "late start late start late start"
    assert title(" " * 5_000 + "x" * 200) == "x" * 79 + "…"
    # A user message of whitespace alone says nothing: the next one names the conversation.
    assert title(" \n\t ", "", "  second  try ") == "second try"
    assert title(" \n ") is None
