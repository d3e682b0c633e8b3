"""Reading what the gateway wrote, straight from the database under test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, select, text
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from capture.codec import from_entry, to_entry
from capture.rows import Record
from gateway.metrics import Metrics
from storage import history
from storage.batch import write_batch
from storage.database import create_engine, ensure_database, migrate
from storage.dsn import parse_dsn
from storage.partitions import Partitions
from storage.schema import completions
from storage.spool import Spool
from storage.writer import HistoryWriter, spool_record


@asynccontextmanager
async def migrated(dsn: str, pool_size: int = 2) -> AsyncIterator[AsyncEngine]:
    """An engine on ``dsn``, its database made and both schemas migrated."""
    engine = create_engine(await ensure_database(dsn), pool_size=pool_size)
    try:
        await migrate(engine, "history")
        await migrate(engine, "main")
        yield engine
    finally:
        await engine.dispose()


class SpooledWriter(HistoryWriter):
    """The writer as a gateway's writer process runs it, following a spool slot, with the
    gateway's side beside it: ``submit`` appends a record to the slot, as the request path
    does."""

    def __init__(self, engine: AsyncEngine, owner: Spool, **options: Any) -> None:
        follower = Spool(owner.root, owner.max_bytes)
        assert owner.slot is not None
        follower.follow(owner.slot)
        super().__init__(engine, Metrics(), follower, encode=to_entry, decode=from_entry, **options)
        self.owner = owner

    def submit(self, record: Record) -> bool:
        return spool_record(self.owner, self.metrics, to_entry, record)

    async def close(self, grace: float) -> None:
        await super().close(grace)
        self.owner.close()


def spooled_writer(
    engine: AsyncEngine,
    folder: Path,
    batch_size: int,
    flush_interval: float = 0.05,
    partitions: Partitions | None = None,
) -> SpooledWriter:
    """The gateway's writer on ``engine``, over a fresh spool in ``folder``, not started."""
    spool = Spool(folder / "spool", 2**30)
    spool.open()
    return SpooledWriter(
        engine,
        spool,
        batch_size=batch_size,
        flush_interval=flush_interval,
        retry_seconds=1.0,
        partitions=partitions,
    )


async def write_records(engine: AsyncEngine, *records: Record) -> None:
    """Write ``records`` in one batch, in one transaction, as the writer does."""
    async with engine.begin() as connection:
        await write_batch(connection, [record.rows() for record in records])


async def until_written(writer: HistoryWriter, count: int, timeout: float = 10.0) -> None:
    """Wait until ``writer`` has written ``count`` records in all."""
    deadline = time.monotonic() + timeout
    while writer.metrics.counters["records_written"] < count:
        if time.monotonic() > deadline:
            written = writer.metrics.counters["records_written"]
            raise AssertionError(f"{written} of {count} records written in {timeout} s")
        await asyncio.sleep(0.05)


class HistoryDB:
    def __init__(self, dsn: str) -> None:
        self.database = parse_dsn(dsn)
        self.engine: AsyncEngine = create_engine(self.database, pool_size=2)

    async def close(self) -> None:
        await self.engine.dispose()

    async def count(self, table: str) -> int:
        async with self.engine.connect() as connection:
            return int(await connection.scalar(text(f"SELECT COUNT(*) FROM {table}")) or 0)

    async def completions(self) -> list[RowMapping]:
        async with self.engine.connect() as connection:
            result = await connection.execute(select(completions))
            return list(result.mappings())

    async def wait_for(self, table: str, expected: int, timeout: float = 60.0) -> int:
        """Poll until ``table`` holds ``expected`` rows (or the time is up); the last count."""
        deadline = time.monotonic() + timeout
        count = -1
        while time.monotonic() < deadline:
            try:
                count = await self.count(table)
            except Exception:  # the table may not exist yet while the gateway migrates
                count = -1
            if count >= expected:
                # Give a straggler the chance to show up as one too many.
                await asyncio.sleep(0.3)
                return await self.count(table)
            await asyncio.sleep(0.1)
        return count

    async def request_and_answer(self, row: RowMapping) -> tuple[list[dict[str, Any]], Any]:
        async with self.engine.connect() as connection:
            request = await history.request_messages(connection, row)
            answer = await history.answer_message(connection, row)
            return request, answer

    async def all_text(self) -> str:
        """Every value in every history table, as one string, for leak checks."""
        parts = []
        async with self.engine.connect() as connection:
            for table in ("completions", "messages", "conversations", "request_logs"):
                rows = await connection.execute(text(f"SELECT * FROM {table}"))
                parts.extend(repr(tuple(row)) for row in rows)
            tables = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
            if "api_keys" in tables:
                rows = await connection.execute(text("SELECT * FROM api_keys"))
                parts.extend(repr(tuple(row)) for row in rows)
        return "\n".join(parts)

    async def scalar(self, query: Any) -> Any:
        async with self.engine.connect() as connection:
            return await connection.scalar(query)

    async def rows(self, query: Any) -> list[RowMapping]:
        async with self.engine.connect() as connection:
            return list((await connection.execute(query)).mappings())


async def lock_waits(engine: AsyncEngine) -> int:
    """How many transactions wait for a lock (PostgreSQL and MySQL; SQLite: none).

    MariaDB's ``innodb_trx`` shows a transaction waiting for a row lock as ``RUNNING`` as
    often as not, so there a waiter is a locking read in the process list: it reads a row
    the other transaction wrote and has not committed, so it waits until that commits."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return 1  # a second writer waits for the database's one write lock
    query = (
        "SELECT count(*) FROM pg_locks WHERE NOT granted"
        if dialect == "postgresql"
        else "SELECT count(*) FROM information_schema.processlist"
        " WHERE id <> connection_id()"
        " AND (info LIKE '%%FOR UPDATE' OR info LIKE '%%LOCK IN SHARE MODE')"
    )
    async with engine.connect() as connection:
        return int((await connection.exec_driver_sql(query)).scalar() or 0)
