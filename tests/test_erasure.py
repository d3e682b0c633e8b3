"""An erased user stays erased: records of theirs that were still on their way when the
erasure ran (spooled, or in a batch being written) are dropped, on every backend."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from capture.chat import ChatExchange
from storage.erasures import erase_owner
from storage.schema import completions
from tests.history_db import SpooledWriter, lock_waits, migrated, spooled_writer
from tests.test_message_store import exchange


def record(owner: str, n: int) -> ChatExchange:
    return dataclasses.replace(exchange([{"role": "user", "content": f"{owner} {n}"}]), owner=owner)


async def owners_stored(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        found = await connection.scalars(select(completions.c.owner).order_by(completions.c.owner))
        return list(found)


async def until_handled(writer: SpooledWriter, count: int, timeout: float = 60.0) -> None:
    """Until the writer has written or dropped ``count`` records."""
    counters = writer.metrics.counters
    deadline = time.monotonic() + timeout
    while counters["records_written"] + counters["records_erased"] < count:
        assert time.monotonic() < deadline, dict(counters)
        await asyncio.sleep(0.02)


async def test_records_spooled_before_an_erasure_are_not_written_after_it(
    history_dsn: str, tmp_path: Path
) -> None:
    async with migrated(history_dsn) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=10)
        for n in range(3):  # the database was down: these wait in the spool
            assert writer.submit(record("erin", n)) and writer.submit(record("bob", n))
        async with engine.begin() as connection:
            await erase_owner(connection, "erin")
        writer.start()
        await until_handled(writer, 6)
        assert writer.submit(record("erin", 3)) and writer.submit(record("bob", 3))
        await until_handled(writer, 8)
        await writer.close(grace=10)
        assert await owners_stored(engine) == ["bob"] * 4
    assert writer.metrics.counters["records_erased"] == 4


async def test_a_batch_written_while_an_erasure_runs_waits_for_it_and_drops_its_records(
    history_dsn: str, tmp_path: Path
) -> None:
    async with migrated(history_dsn, pool_size=3) as engine:
        writer = spooled_writer(engine, tmp_path, batch_size=10)
        writer.start()
        assert writer.submit(record("bob", 0))  # the writer reads the erased owners: none
        await until_handled(writer, 1)
        async with engine.connect() as erasure:
            transaction = await erasure.begin()
            await erase_owner(erasure, "erin")  # not committed yet
            assert writer.submit(record("erin", 0)) and writer.submit(record("bob", 1))
            # The batch waits: for the gate (PostgreSQL, MySQL) or the write lock (SQLite).
            deadline = time.monotonic() + 30
            while await lock_waits(engine) == 0:
                assert time.monotonic() < deadline, "the batch never waited for the erasure"
                await asyncio.sleep(0.02)
            await transaction.commit()
        await until_handled(writer, 3)
        await writer.close(grace=10)
        assert await owners_stored(engine) == ["bob", "bob"]
    assert writer.metrics.counters["records_erased"] == 1
