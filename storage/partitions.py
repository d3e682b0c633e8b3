"""Daily partitions of the history tables that grow by a row per request: ``completions``
and ``request_logs`` (``MES_DAILY_PARTITION=true``).

Each day's rows live in a partition of their own, named from the day alone
(``completions_p20261123``), so that retention drops a whole day at once instead of
deleting its rows one by one, and a day's statistics read only that day. The parent table
keeps its name, and every query reads it as before: the database spans the days.

Messages and conversations are not split by day: a message is stored once per
conversation however many days its turns span (see ``capture/chain.py``), so it belongs
to no single day. Retention removes what the dropped days leave unused in small steps
(``storage/retention.py``).

PostgreSQL uses declarative range partitions; MySQL and MariaDB list partitions on
``TO_DAYS(started_at)``; SQLite, which has no partitions, a table per day under a view (see
the end of this module). A table that held history before partitioning was turned on
stays readable: on PostgreSQL it becomes one "legacy" partition holding everything up to
the day after its newest row, on SQLite a "legacy" table under the view; on MySQL the
table is rewritten once into daily partitions.

Partition names and bounds come only from ``datetime.date`` values: nothing a client
sends reaches the DDL.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Column, DefaultClause, MetaData, Table, delete, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import quoted_name

from storage.locks import named_lock
from storage.schema import DAILY, history_metadata, latency_daily, usage_daily

log = logging.getLogger("mes.partitions")

TABLES = tuple(table.name for table in DAILY)
LEGACY = "legacy"
_DAY_NAME = re.compile(rf"^({'|'.join(TABLES)})_p(\d{{8}})$")
_BOUND = re.compile(r"TO \('(\d{4}-\d{2}-\d{2})")
# MySQL's TO_DAYS counts from year 0; Python's ordinals from 0001-01-01 = 1.
_TO_DAYS_OFFSET = 365


async def partitions_in_use(engine: AsyncEngine, wanted: bool, today: date) -> Partitions | None:
    """The day partitions to write into: made if ``wanted`` (``MES_DAILY_PARTITION``), or
    found if a start that wanted them split the database before. A database once split stays
    split: turning the setting off then would leave rows with no table to go to (SQLite's
    view takes no rows, PostgreSQL's parent no row of a day it has no partition for), so the
    layout that exists wins, and says so."""
    partitions = Partitions(engine)
    if not wanted:
        if not await partitions.in_use():
            return None
        log.warning(
            "MES_DAILY_PARTITION is off, but this history database was split into daily "
            "partitions when it was on: writing into them (set MES_DAILY_PARTITION=true to "
            "say so; a database once split stays split)"
        )
    await partitions.setup(today)
    return partitions


class PartitionChanged(Exception):
    """A day's partition does not hold what was archived of it: not dropped this round."""


# Given a day about to be dropped, keeps its rows elsewhere (an archive); how many
# completions and request logs it kept.
KeepDay = Callable[[date], Awaitable[tuple[int, int]]]


def partition_name(table: str, day: date) -> str:
    """The name of ``table``'s partition for ``day``: made only from a ``date``."""
    if table not in TABLES:
        raise ValueError(f"{table!r} is not partitioned")
    if type(day) is not date:  # a datetime is a date too: refuse it, and strings, alike
        raise TypeError(f"a partition is named from a date, not {type(day).__name__}")
    return f"{table}_p{day:%Y%m%d}"


def day_of(name: str) -> date | None:
    match = _DAY_NAME.match(name)
    return datetime.strptime(match[2], "%Y%m%d").date() if match else None


def _literal(day: date) -> str:
    """A day as SQL text: digits and dashes from ``date.isoformat()``, nothing else."""
    if type(day) is not date:
        raise TypeError(f"expected a date, not {type(day).__name__}")
    return f"'{day.isoformat()}'"


def _to_days(day: date) -> int:
    """MySQL's ``TO_DAYS(day)``."""
    return day.toordinal() + _TO_DAYS_OFFSET


class Partitions:
    """The day partitions of one history database: made ahead, on demand, and dropped."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.kind = engine.dialect.name
        self._days: dict[str, set[date]] = {table: set() for table in TABLES}
        self._legacy: dict[str, date] = {}  # PostgreSQL: table -> the end of its legacy part
        self._guard = asyncio.Lock()
        self._day_tables: dict[str, Table] = {}

    async def setup(self, today: date) -> None:
        """Make the tables partitioned if they are not yet (once, whichever replica gets
        there first), with partitions for today and tomorrow."""
        async with named_lock(self.engine, "mes-migrate-history", wait=True):
            async with self.engine.begin() as connection:
                if self.kind == "sqlite":
                    await _sqlite_transaction(connection)
                for table in TABLES:
                    if not await self._is_partitioned(connection, table):
                        await self._convert(connection, table, today)
        await self.refresh()
        await self.ensure([today, today + timedelta(days=1)])

    async def in_use(self) -> bool:
        """Whether the database is split by day already (by a start that asked for it)."""
        async with self.engine.connect() as connection:
            return any([await self._is_partitioned(connection, table) for table in TABLES])

    async def refresh(self) -> None:
        async with self.engine.connect() as connection:
            self._legacy = {}
            for table in TABLES:
                self._days[table] = await self._table_days(connection, table)

    def _covers(self, table: str, day: date) -> bool:
        legacy = self._legacy.get(table)
        return day in self._days[table] or (legacy is not None and day < legacy)

    def covers(self, day: date) -> bool:
        return all(self._covers(table, day) for table in TABLES)

    async def ensure(self, days: Iterable[date]) -> None:
        """Make sure every day in ``days`` has its partitions (cheap when they exist)."""
        missing = sorted({d for d in days if not self.covers(d)})
        if not missing:
            return
        async with self._guard, named_lock(self.engine, "mes-partitions", wait=True):
            await self.refresh()
            for day in missing:
                for table in TABLES:
                    if not self._covers(table, day):
                        await self._create(table, day)
                        self._days[table].add(day)
                log.info("made the history partitions for %s", day)

    @property
    def day_table(self) -> Callable[[str, date], Table] | None:
        """Where the writer puts a day's rows itself: SQLite's table of that day (the
        other backends route rows to their partitions on their own)."""
        return self._sqlite_day_table if self.kind == "sqlite" else None

    def holds(self, table: str, day: date) -> bool:
        """Whether ``table`` has a partition of ``day`` (as last read)."""
        return day in self._days[table]

    def of_day(self, table: str, day: date) -> tuple[Table, str | None]:
        """What to select ``day``'s rows of ``table`` from, to read its partition alone:
        the day's table (SQLite, PostgreSQL), or the table with a MySQL hint naming the
        partition."""
        if self.kind == "mysql":
            return history_metadata.tables[table], f"PARTITION ({partition_name(table, day)})"
        return self._sqlite_day_table(table, day), None

    def _sqlite_day_table(self, table: str, day: date) -> Table:
        name = partition_name(table, day)
        if name not in self._day_tables:
            self._day_tables[name] = history_metadata.tables[table].to_metadata(
                MetaData(), name=name
            )
        return self._day_tables[name]

    async def days(self) -> list[date]:
        """The days that have their own partitions (in every partitioned table)."""
        await self.refresh()
        return sorted(set.intersection(*(self._days[table] for table in TABLES)))

    async def drop_before(
        self, day: date, keep: KeepDay | None = None
    ) -> dict[date, tuple[int, int]]:
        """Drop every day partition of a day before ``day``; for each day dropped, how many
        completions and request logs it held. ``keep`` is given each day first (an archive
        writes it) and says how many of each it kept: a partition that holds another count
        when it is dropped (a late record written to it meanwhile) is left for the next
        round, which keeps it again (``PartitionChanged``)."""
        dropped: dict[date, tuple[int, int]] = {}
        async with named_lock(self.engine, "mes-partitions", wait=True):
            await self.refresh()
            for table in TABLES:
                if self.kind != "postgresql" and not any(d >= day for d in self._days[table]):
                    # MySQL cannot drop a table's last partition; SQLite's view needs a table
                    await self._create(table, day)
                    self._days[table].add(day)
            old_days = sorted({d for table in TABLES for d in self._days[table] if d < day})
            for old in old_days:
                kept = await keep(old) if keep is not None else None
                counts = []
                try:
                    if kept is not None:  # every table as archived, before any is dropped
                        for index, table in enumerate(TABLES):
                            if old in self._days[table]:
                                name = partition_name(table, old)
                                await self._count(table, name, kept[index])
                    for index, table in enumerate(TABLES):
                        if old in self._days[table]:
                            expected = None if kept is None else kept[index]
                            name = partition_name(table, old)
                            counts.append(await self._drop(table, name, expected))
                            self._days[table].discard(old)
                        else:
                            counts.append(0)
                except PartitionChanged as changed:
                    log.warning("%s: kept for the next round", changed)
                    if not counts:  # nothing of the day dropped
                        continue
                    counts += [0] * (len(TABLES) - len(counts))
                dropped[old] = (counts[0], counts[1])
                async with self.engine.begin() as connection:  # the day's usage went with it
                    for usage in (usage_daily, latency_daily):
                        await connection.execute(delete(usage).where(usage.c.day == old))
                for table in TABLES:
                    self._days[table].discard(old)
                log.info("dropped the history partitions of %s: %s rows", old, counts)
        return dropped

    async def drop_empty_legacy(self, before: date) -> list[str]:
        """Drop PostgreSQL's legacy partitions (the history from before partitioning) once
        they are empty and wholly older than ``before``: retention empties them row by row."""
        gone = []
        async with named_lock(self.engine, "mes-partitions", wait=True):
            await self.refresh()
            legacy = dict(self._legacy)
            if self.kind == "sqlite":  # no bounds: any day may still be in it
                legacy = {t: date.min for t in TABLES if await self._sqlite_has_legacy(t)}
            for table, until in sorted(legacy.items()):
                name = f"{table}_{LEGACY}"
                async with self.engine.connect() as connection:
                    rows = await connection.scalar(text(f"SELECT 1 FROM {name} LIMIT 1"))
                if until <= before and not rows:
                    await self._drop(table, name)
                    gone.append(name)
            for name in gone:
                self._legacy.pop(name.removesuffix(f"_{LEGACY}"), None)
        return gone

    # -- per backend ----------------------------------------------------------------------

    async def _is_partitioned(self, connection: AsyncConnection, table: str) -> bool:
        if self.kind == "sqlite":
            kind = await connection.scalar(
                text("SELECT type FROM sqlite_master WHERE name = :name"), {"name": table}
            )
            return bool(kind == "view")
        if self.kind == "postgresql":
            kind = await connection.scalar(
                text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:name)"),
                {"name": table},
            )
            return kind in ("p", b"p")  # asyncpg gives a "char" as bytes
        count = await connection.scalar(
            text(
                "SELECT COUNT(*) FROM information_schema.PARTITIONS WHERE TABLE_SCHEMA = "
                "DATABASE() AND TABLE_NAME = :name AND PARTITION_NAME IS NOT NULL"
            ),
            {"name": table},
        )
        return bool(count)

    async def _table_days(self, connection: AsyncConnection, table: str) -> set[date]:
        days, legacy_end = await _parts(connection, table)
        if legacy_end is not None:
            self._legacy[table] = legacy_end
        return days

    async def _create(self, table: str, day: date) -> None:
        name = partition_name(table, day)
        if self.kind == "sqlite":
            async with self.engine.begin() as connection:
                await _sqlite_transaction(connection)
                await _sqlite_create(connection, table, name)
                await _sqlite_view(connection, table)
            return
        if self.kind == "postgresql":
            statement = (
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
                f"FOR VALUES FROM ({_literal(day)}) TO ({_literal(day + timedelta(days=1))})"
            )
        else:
            statement = (
                f"ALTER TABLE {table} ADD PARTITION (PARTITION {name} VALUES IN ({_to_days(day)}))"
            )
        async with self.engine.begin() as connection:
            try:
                await connection.execute(text(statement))
            except DBAPIError as error:  # made meanwhile by a replica that held no lock
                if "Duplicate partition" not in str(error) and "already exists" not in str(error):
                    raise

    async def _count(self, table: str, name: str, expected: int) -> None:
        """``PartitionChanged`` unless ``table``'s partition ``name`` holds ``expected`` rows."""
        source = f"{table} PARTITION ({name})" if self.kind == "mysql" else name
        async with self.engine.connect() as connection:
            rows = int(await connection.scalar(text(f"SELECT COUNT(*) FROM {source}")) or 0)
        if rows != expected:
            raise PartitionChanged(f"{name} holds {rows} rows, {expected} were archived")

    async def _drop(self, table: str, name: str, expected: int | None = None) -> int:
        """Drop ``table``'s partition ``name``; how many rows it held. Unless it holds
        ``expected`` rows (when given): then ``PartitionChanged``, and it stays. On
        PostgreSQL it is first detached concurrently, which never makes writers to other
        days wait (a plain DROP would lock the whole table for a moment)."""

        def counted(rows: int) -> int:
            if expected is not None and rows != expected:
                raise PartitionChanged(f"{name} holds {rows} rows, {expected} were archived")
            return rows

        if self.kind == "sqlite":
            async with self.engine.begin() as connection:
                await _sqlite_transaction(connection)
                rows = int(await connection.scalar(text(f"SELECT COUNT(*) FROM {name}")) or 0)
                counted(rows)
                await connection.execute(text(f"DROP TABLE {name}"))
                await _sqlite_view(connection, table)
            return rows
        if self.kind == "postgresql":
            async with self.engine.connect() as connection:
                rows = int(await connection.scalar(text(f"SELECT COUNT(*) FROM {name}")) or 0)
                counted(rows)
                await connection.commit()
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.execute(
                    text(f"ALTER TABLE {table} DETACH PARTITION {name} CONCURRENTLY")
                )
                await autocommit.execute(text(f"DROP TABLE {name}"))
            return rows
        async with self.engine.begin() as connection:
            count = f"SELECT COUNT(*) FROM {table} PARTITION ({name})"
            rows = counted(int(await connection.scalar(text(count)) or 0))
            await connection.execute(text(f"ALTER TABLE {table} DROP PARTITION {name}"))
        return rows

    async def _sqlite_has_legacy(self, table: str) -> bool:
        async with self.engine.connect() as connection:
            return f"{table}_{LEGACY}" in await _sqlite_tables(connection, table)

    async def _convert(self, connection: AsyncConnection, table: str, today: date) -> None:
        if self.kind == "sqlite":
            await _sqlite_convert(connection, table, today)
            return
        if self.kind == "postgresql":
            await self._convert_postgres(connection, table)
        else:
            await self._convert_mysql(connection, table, today)

    async def _convert_postgres(self, connection: AsyncConnection, table: str) -> None:
        newest = await connection.scalar(text(f"SELECT MAX(started_at) FROM {table}"))
        legacy = f"{table}_{LEGACY}"
        indexes = (
            await connection.execute(
                text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :name"),
                {"name": table},
            )
        ).all()
        await connection.execute(text(f"ALTER TABLE {table} RENAME TO {legacy}"))
        await connection.execute(
            text(f"ALTER TABLE {legacy} RENAME CONSTRAINT {table}_pkey TO {legacy}_pkey")
        )
        for index_name, _ in indexes:
            if index_name != f"{table}_pkey":
                await connection.execute(
                    text(f"ALTER INDEX {index_name} RENAME TO {legacy}_{index_name}")
                )
        # The columns' compression (LZ4 where history_0006 set it) goes with them, and from
        # the parent to each day's partition (PostgreSQL 14 and later have one to take).
        version = connection.dialect.server_version_info or (0,)
        compression = " INCLUDING COMPRESSION" if version >= (14,) else ""
        await connection.execute(
            text(
                f"CREATE TABLE {table} (LIKE {legacy} INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
                f"{compression}, PRIMARY KEY (id, started_at)) PARTITION BY RANGE (started_at)"
            )
        )
        for index_name, definition in indexes:
            if index_name != f"{table}_pkey":
                await connection.execute(text(definition))  # the same name, on the parent
        if newest is None:
            await connection.execute(text(f"DROP TABLE {legacy}"))
            log.info("%s is now split by day", table)
            return
        until = newest.date() + timedelta(days=1)
        # The parent's key is (id, started_at), and a partition cannot have another one.
        await connection.execute(text(f"ALTER TABLE {legacy} DROP CONSTRAINT {legacy}_pkey"))
        await connection.execute(
            text(
                f"ALTER TABLE {table} ATTACH PARTITION {legacy} "
                f"FOR VALUES FROM (MINVALUE) TO ({_literal(until)})"
            )
        )
        log.info("%s is now split by day; its history before %s is one partition", table, until)

    async def _convert_mysql(self, connection: AsyncConnection, table: str, today: date) -> None:
        rows = (
            await connection.execute(text(f"SELECT DISTINCT DATE(started_at) FROM {table}"))
        ).scalars()
        days = sorted({day for day in rows if day is not None} | {today})
        partitions = ", ".join(
            f"PARTITION {partition_name(table, day)} VALUES IN ({_to_days(day)})" for day in days
        )
        await connection.execute(
            text(
                f"ALTER TABLE {table} DROP PRIMARY KEY, ADD PRIMARY KEY (id, started_at) "
                f"PARTITION BY LIST (TO_DAYS(started_at)) ({partitions})"
            )
        )
        log.info("%s is now split by day (%d days of history moved)", table, len(days) - 1)


# -- SQLite: a table per day, read through a view ---------------------------------------
#
# SQLite has no partitioned tables. Each day is a table of its own, with the same columns
# and indexes (named after it), and ``completions`` becomes a view over all of them (and
# over the table that held the history before, if any). Triggers on the view send an
# INSERT to the table of its row's day (refusing a day that has none), and an UPDATE or a
# DELETE to every table. Dropping a day is dropping its table. The view and its triggers
# are made again whenever a day is added or dropped, in the same transaction.


async def _parts(connection: AsyncConnection, table: str) -> tuple[set[date], date | None]:
    """The days ``table`` has a part of its own for, and where its legacy part ends
    (PostgreSQL; None elsewhere, or without one)."""
    kind = connection.dialect.name
    if kind == "sqlite":
        return {
            day for name in await _sqlite_tables(connection, table) if (day := day_of(name))
        }, None
    legacy_end = None
    if kind == "postgresql":
        rows = (
            await connection.execute(
                text(
                    "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = to_regclass(:name)"
                ),
                {"name": table},
            )
        ).all()
        for name, bound in rows:
            if name == f"{table}_{LEGACY}" and (match := _BOUND.search(bound or "")):
                legacy_end = date.fromisoformat(match[1])
    else:
        rows = (
            await connection.execute(
                text(
                    "SELECT PARTITION_NAME FROM information_schema.PARTITIONS WHERE "
                    "TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :name "
                    "AND PARTITION_NAME IS NOT NULL"
                ),
                {"name": table},
            )
        ).all()
    return {day for row in rows if (day := day_of(row[0])) is not None}, legacy_end


async def first_part_end(connection: AsyncConnection, table: str) -> datetime | None:
    """Where the oldest part of ``table``, split by day, ends: every row of it starts
    before then, every other part's row after. None where the table is not split by day,
    and where its oldest part's end is not known (SQLite's legacy table)."""
    kind = connection.dialect.name
    if kind == "sqlite":
        names = await _sqlite_tables(connection, table)
        first = day_of(names[0]) if names else None
        return None if first is None else datetime.combine(first + timedelta(days=1), time())
    days, legacy_end = await _parts(connection, table)
    if legacy_end is not None:
        return datetime.combine(legacy_end, time())
    return datetime.combine(min(days) + timedelta(days=1), time()) if days else None


async def _sqlite_transaction(connection: AsyncConnection) -> None:
    """Open the transaction now: Python's sqlite3 would otherwise run each DDL statement
    on its own, and a writer could see the view between a table dropped and the view
    made again without it."""
    await connection.exec_driver_sql("BEGIN IMMEDIATE")


async def _sqlite_tables(connection: AsyncConnection, table: str) -> list[str]:
    """The tables ``table``'s view reads: its legacy table first, then its days in order."""
    names = (
        await connection.execute(
            text("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE :like"),
            {"like": f"{table}_%"},
        )
    ).scalars()
    days = sorted(name for name in names if day_of(name))
    legacy = f"{table}_{LEGACY}"
    has_legacy = await connection.scalar(
        text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name"),
        {"name": legacy},
    )
    return ([legacy] if has_legacy else []) + days


async def _sqlite_create(connection: AsyncConnection, table: str, name: str) -> None:
    day_table = history_metadata.tables[table].to_metadata(MetaData(), name=name)
    for index in day_table.indexes:
        index.name = quoted_name(f"{index.name}_{name.rsplit('_', 1)[1]}", None)
    await connection.run_sync(lambda sync: day_table.create(sync, checkfirst=True))


async def _sqlite_view(connection: AsyncConnection, table: str) -> None:
    names = await _sqlite_tables(connection, table)
    columns = [column.name for column in history_metadata.tables[table].columns]
    listed = ", ".join(columns)
    new = ", ".join(_new_value(history_metadata.tables[table].c[column]) for column in columns)
    await connection.execute(text(f"DROP VIEW IF EXISTS {table}"))  # and its triggers
    await connection.execute(
        text(
            f"CREATE VIEW {table} AS "
            + " UNION ALL ".join(f"SELECT {listed} FROM {name}" for name in names)
        )
    )
    days = [(name, day) for name in names if (day := day_of(name)) is not None]
    routes = "".join(
        f"INSERT INTO {name} ({listed}) SELECT {new} "
        f"WHERE substr(NEW.started_at, 1, 10) = {_literal(day)}; "
        for name, day in days
    )
    known = ", ".join(_literal(day) for _, day in days) or "''"
    await connection.execute(
        text(
            f"CREATE TRIGGER {table}_insert INSTEAD OF INSERT ON {table} BEGIN "
            f"SELECT RAISE(ABORT, 'no partition for this day') "
            f"WHERE substr(NEW.started_at, 1, 10) NOT IN ({known}); {routes}END"
        )
    )
    assigned = ", ".join(f"{column} = NEW.{column}" for column in columns)
    await connection.execute(
        text(
            f"CREATE TRIGGER {table}_update INSTEAD OF UPDATE ON {table} BEGIN "
            + "".join(f"UPDATE {name} SET {assigned} WHERE id = OLD.id; " for name in names)
            + "END"
        )
    )
    await connection.execute(
        text(
            f"CREATE TRIGGER {table}_delete INSTEAD OF DELETE ON {table} BEGIN "
            + "".join(f"DELETE FROM {name} WHERE id = OLD.id; " for name in names)
            + "END"
        )
    )


def _new_value(column: Column[Any]) -> str:
    """A column of the row a view's INSERT trigger routes: what the statement gave, or the
    column's default where it gave none (a view has no defaults of its own)."""
    default = column.server_default
    if isinstance(default, DefaultClause) and isinstance(default.arg, str):
        literal = default.arg.replace("'", "''")
        return f"COALESCE(NEW.{column.name}, '{literal}')"
    return f"NEW.{column.name}"


async def _sqlite_convert(connection: AsyncConnection, table: str, today: date) -> None:
    rows = await connection.scalar(text(f"SELECT 1 FROM {table} LIMIT 1"))
    if rows:
        await connection.execute(text(f"ALTER TABLE {table} RENAME TO {table}_{LEGACY}"))
    else:
        await connection.execute(text(f"DROP TABLE {table}"))
    await _sqlite_create(connection, table, partition_name(table, today))
    await _sqlite_view(connection, table)
    log.info("%s is now a table per day%s", table, "; the history before is one" if rows else "")
