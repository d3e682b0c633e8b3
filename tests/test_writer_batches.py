"""The writer's batches: bounded in bytes as well as in records, and every record written
once, in spool order; when behind, the next batch built during the write before it; when
keeping up, gathered for the flush interval."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from capture.chat import ChatExchange
from storage import writer as writer_module
from storage.batch import write_batch
from storage.schema import completions, conversations, messages, usage_daily
from storage.spool import Position, Spool
from tests.history_db import SpooledWriter, migrated, spooled_writer, until_written
from tests.test_message_store import exchange


async def test_batches_of_large_prompts_stay_under_the_byte_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real_write_batch = writer_module.write_batch

    async def counted(connection: Any, rowsets: Any, day_table: Any = None) -> int:
        sizes.append(len(rowsets))
        return await real_write_batch(connection, rowsets, day_table)

    monkeypatch.setattr(writer_module, "write_batch", counted)
    monkeypatch.setattr(writer_module, "BATCH_BYTES", 3 * 2**20)
    prompt = "x" * 2**20  # 1 MiB
    large = [exchange([{"role": "user", "content": f"{n} {prompt}"}]) for n in range(24)]
    small = [exchange([{"role": "user", "content": f"small {n}"}]) for n in range(100)]
    async with migrated(str(tmp_path / "history.db")) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=200)
        for record in large + small:
            assert writer.submit(record)
        writer.start()
        await writer.close(grace=60)
        async with engine.connect() as connection:
            stored = await connection.scalar(select(func.count()).select_from(completions))
    assert stored == len(large) + len(small)
    assert sum(sizes) == stored
    # Three spooled entries of a little over 1 MiB pass 3 MiB: a batch of large prompts
    # holds three; then the small ones go 200 at a time (100 here, with the last large).
    assert sizes[: len(large) // 3] == [3] * (len(large) // 3)


@pytest.mark.parametrize("behind", [True, False])
async def test_behind_the_next_batch_is_shaped_while_the_one_before_is_written(
    behind: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_write_batch = writer_module.write_batch
    real_rows = ChatExchange.rows

    async def slow(connection: Any, rowsets: Any, day_table: Any = None) -> int:
        events.append("write")
        await asyncio.sleep(0.2)  # the database takes its time to answer
        written = await real_write_batch(connection, rowsets, day_table)
        events.append("written")
        return written

    def rows(record: ChatExchange) -> Any:
        events.append("rows")
        return real_rows(record)

    monkeypatch.setattr(writer_module, "write_batch", slow)
    monkeypatch.setattr(ChatExchange, "rows", rows)
    # Behind at once, or never (caught up less than a minute ago, as a test always is).
    monkeypatch.setattr(writer_module, "BEHIND_SECONDS", 0.0 if behind else 60.0)
    records = [exchange([{"role": "user", "content": f"turn {n}"}]) for n in range(40)]
    async with migrated(str(tmp_path / "history.db")) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=20)
        for record in records:
            assert writer.submit(record)
        writer.start()
        await writer.close(grace=60)
        async with engine.connect() as connection:
            stored = await connection.scalar(select(func.count()).select_from(completions))
    assert stored == len(records)
    assert events.count("write") == 2
    first, answered = events.index("write"), events.index("written")
    if behind:
        # The first batch was being written (sent, not yet answered) while every row of
        # the second was shaped: the write did not wait for the shaping, nor it for the
        # write.
        assert events[:first] == ["rows"] * 20
        assert events[first:answered].count("rows") == 20
    else:
        # Keeping up, the writer and the database take turns: the second batch was
        # shaped before the first was sent.
        assert events[:first] == ["rows"] * 40


async def test_keeping_up_a_batch_gathers_for_the_flush_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a steady load the writer keeps up, and each batch takes all there is: the next
    then waits out ``flush_interval`` from it, gathering what comes during the write and
    after, rather than taking at once what came during the write; closing, it waits no
    more."""
    sizes: list[int] = []
    released = asyncio.Event()
    real_write_batch = writer_module.write_batch

    async def gated(connection: Any, rowsets: Any, day_table: Any = None) -> int:
        sizes.append(len(rowsets))
        await released.wait()  # the database takes its time with the first batch
        return await real_write_batch(connection, rowsets, day_table)

    monkeypatch.setattr(writer_module, "write_batch", gated)
    records = [exchange([{"role": "user", "content": f"turn {n}"}]) for n in range(5)]
    async with migrated(str(tmp_path / "history.db")) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=100, flush_interval=3600)
        assert writer.submit(records[0])
        writer.start()
        await until(lambda: sizes == [1])  # all there was: the writer keeps up
        for record in records[1:3]:  # during the first batch's write
            assert writer.submit(record)
        released.set()
        await until_written(writer, 1)
        for record in records[3:]:  # after it
            assert writer.submit(record)
        await writer.close(grace=60)  # well within the hour the batch would gather
        async with engine.connect() as connection:
            stored = await connection.scalar(select(func.count()).select_from(completions))
    assert stored == len(records)
    assert sizes == [1, 4]


async def test_a_column_added_while_the_writer_runs_loses_no_record(
    history_dsn: str, tmp_path: Path
) -> None:
    """A newer gateway's migration may add a column to a table this writer is writing (a
    rolling upgrade). On PostgreSQL the writer sends each table's rows as its row type,
    whose fields asyncpg learnt once per connection: the batch after the change still
    goes through, not into the dead letters."""
    async with migrated(history_dsn, pool_size=1) as engine:

        async def add_columns() -> None:
            async with engine.begin() as connection:
                for table in ("messages", "completions"):
                    await connection.execute(text(f"ALTER TABLE {table} ADD COLUMN later TEXT"))

        await write_across(engine, tmp_path, add_columns)


async def write_across(
    engine: AsyncEngine, folder: Path, change: Callable[[], Awaitable[None]]
) -> None:
    """The writer running on ``engine`` writes five records, ``change`` happens, and five
    more: all ten are stored, none dead-lettered."""
    writer = spooled_writer(engine, folder, batch_size=10)
    writer.start()
    for n in range(5):
        assert writer.submit(exchange([{"role": "user", "content": f"before {n}"}]))
    await until_written(writer, 5)
    await change()
    for n in range(5):
        assert writer.submit(exchange([{"role": "user", "content": f"after {n}"}]))
    await until_written(writer, 10)
    await writer.close(grace=10)
    async with engine.connect() as connection:
        stored = await connection.scalar(select(func.count()).select_from(completions))
        texts = set((await connection.execute(select(messages.c.content_text))).scalars())
    assert stored == 10
    assert {f"after {n}" for n in range(5)} <= texts
    assert writer.metrics.counters["records_dead_lettered"] == 0


async def test_a_writer_told_to_stop_writes_what_was_spooled_just_before(tmp_path: Path) -> None:
    """The gateway appends to its spool slot and its writer process follows it. A record
    spooled just before the gateway tells the writer to stop is written in the grace
    period, even when the writer had been idle and had not looked at the slot since."""
    async with migrated(str(tmp_path / "history.db")) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=10)
        writer.start()
        assert writer.submit(exchange([{"role": "user", "content": "first"}]))
        await until_written(writer, 1)
        await asyncio.sleep(0.1)  # idle: waiting for more
        assert writer.submit(exchange([{"role": "user", "content": "last"}]))
        await writer.close(grace=10)
        async with engine.connect() as connection:
            texts = set((await connection.execute(select(messages.c.content_text))).scalars())
    assert {"first", "last"} <= texts


async def test_a_writer_goes_on_into_a_new_segment_its_gateway_left_empty(tmp_path: Path) -> None:
    """The gateway starts a segment, then dies before it appends to it. Its writer moves
    its checkpoint into the new segment (the old one is whole and written): it used to
    read nothing at the end of the old one, again and again, and take a stop's whole
    grace period."""
    async with migrated(str(tmp_path / "history.db")) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=10)
        writer.start()
        assert writer.submit(exchange([{"role": "user", "content": "before"}]))
        await until_written(writer, 1)
        writer.owner._rotate()  # a new segment, and no record in it
        new_segment = Position(writer.owner.end.segment, 0)
        deadline = time.monotonic() + 10
        while writer.spool.checkpoint < new_segment and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert writer.spool.checkpoint == new_segment
        assert writer.submit(exchange([{"role": "user", "content": "after"}]))
        await until_written(writer, 2)
        await writer.close(grace=10)


async def test_a_spool_failing_to_move_its_checkpoint_once_stops_no_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool's own files can fail (a full disk): the writer used to stop for good,
    its process alive, while records piled up in the spool. It reads the spool again from
    its checkpoint after a pause, and goes on."""
    async with migrated(str(tmp_path / "history.db")) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=10)
        real_commit = writer.spool.commit
        failed: list[Position] = []

        def commit(position: Position) -> None:
            if not failed:
                failed.append(position)
                raise OSError(errno.ENOSPC, "No space left on device")
            real_commit(position)

        monkeypatch.setattr(writer.spool, "commit", commit)
        writer.start()
        assert writer.submit(exchange([{"role": "user", "content": "before"}]))
        await until_written(writer, 1)
        assert writer.submit(exchange([{"role": "user", "content": "after"}]))
        await until_written(writer, 2)
        await writer.close(grace=10)
        async with engine.connect() as connection:
            texts = set((await connection.execute(select(messages.c.content_text))).scalars())
    assert failed and {"before", "after"} <= texts
    again = Spool(tmp_path / "spool", 2**30)
    again.open()
    assert again.pending_bytes == 0  # the checkpoint is past both
    again.close()


async def test_a_writer_failing_after_it_went_idle_counts_as_stalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records arrive, and reading them fails (the spool's disk, say): the writer is not
    idle any more, and /readyz must see the stall; it used to stay idle, and ready."""
    async with migrated(str(tmp_path / "history.db")) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=10)
        writer.start()
        assert writer.submit(exchange([{"role": "user", "content": "before"}]))
        await until_written(writer, 1)
        await until(lambda: writer.stalled_since is None)  # idle
        real_read = writer.spool.read

        def failing(*args: Any) -> Any:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(writer.spool, "read", failing)
        assert writer.submit(exchange([{"role": "user", "content": "after"}]))
        await until(lambda: writer.stalled_since is not None)
        monkeypatch.setattr(writer.spool, "read", real_read)
        await until_written(writer, 2)
        await until(lambda: writer.stalled_since is None)
        await writer.close(grace=10)


async def test_a_writer_taking_over_from_a_stalled_one_keeps_counting_from_its_stall(
    tmp_path: Path,
) -> None:
    """A writer that dies on every try (a record that kills it) is started again and again:
    each new one counts the stall from the one before, or /readyz would never see it."""
    async with migrated(str(tmp_path / "history.db")) as engine:
        spool = Spool(tmp_path / "spool", 2**30)
        spool.open()
        since = time.time() - 3600
        writer = SpooledWriter(
            engine,
            spool,
            batch_size=10,
            flush_interval=0.05,
            retry_seconds=1.0,
            stalled_since=since,
        )
        assert writer.stalled_since == since  # not yet idle: nothing written yet
        writer.start()
        assert writer.submit(exchange([{"role": "user", "content": "at last"}]))
        await until_written(writer, 1)
        await until(lambda: writer.stalled_since is None)
        await writer.close(grace=10)


async def until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        await asyncio.sleep(0.02)


async def test_a_record_twice_in_one_batch_is_stored_and_counted_once(history_dsn: str) -> None:
    """A Redis stream may hold a record twice (a gateway adds it again after losing Redis),
    and a relay may hand both to one batch: its conversation and its day count it once."""
    first = exchange([{"role": "user", "content": "once"}])
    follow = exchange([{"role": "user", "content": "once"}, {"role": "assistant", "content": "a"}])
    async with migrated(history_dsn) as engine:
        async with engine.begin() as connection:
            rowsets = [first.rows(), first.rows(), follow.rows(), first.rows()]
            assert await write_batch(connection, rowsets) == 2
        async with engine.connect() as connection:
            counts = (
                await connection.execute(
                    select(conversations.c.completion_count, conversations.c.message_count)
                )
            ).all()
            requests = await connection.scalar(select(func.sum(usage_daily.c.requests)))
    assert sorted(tuple(row) for row in counts) == [(1, 2), (1, 3)]
    assert requests == 2
