"""Daily partitions (MES_DAILY_PARTITION=true) on PostgreSQL, MariaDB and SQLite (a table
per day): history written over several days reads as one, a day goes at once, and no input
ever reaches the DDL."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import event, func, inspect, select, text, update

from gateway.maintenance import Maintenance
from gateway.metrics import Metrics
from gateway.settings import Settings
from storage import history, retention
from storage.batch import write_batch
from storage.database import create_engine, ensure_database, migrate
from storage.partitions import Partitions, partition_name
from storage.schema import completions, conversations, messages, usage_daily
from storage.writer import is_unavailable
from tests.conftest import database_dsn
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB, migrated, spooled_writer, write_records
from tests.test_retention import PARIS, ROME, turn
from tests.test_writer_batches import write_across

TODAY = date(2026, 6, 15)
NOW = datetime(2026, 6, 15, 12, 0)


@pytest.fixture(params=("postgresql", "mysql", "sqlite"))
def server_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_dsn(request, str(request.param), tmp_path, "parted")


@pytest.fixture
async def engine(server_dsn: str) -> AsyncIterator[Any]:
    async with migrated(server_dsn, pool_size=3) as engine:
        yield engine


async def write_through_the_writer(
    engine: Any, partitions: Partitions, records: list[Any], tmp: Path
) -> None:
    """The gateway's own writer, which makes a missing day's partitions as it goes."""
    writer = spooled_writer(engine, tmp, batch_size=50, flush_interval=0.01, partitions=partitions)
    writer.start()
    for record in records:
        assert writer.submit(record)
    await writer.close(30)
    assert writer.metrics.counters["records_written"] == len(records)


async def test_long_parameters_are_compressed_with_lz4_split_by_day_or_not(
    postgres: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """An agent's request carries its tools, often tens of KB, every time: a completion's
    parameters are compressed with LZ4 (not pglz) as its messages are, whether the days
    were split before the upgrade that set it (each partition is set) or after it (the
    split table takes the setting along)."""
    tools = [
        {"type": "function", "function": {"name": f"tool_{i}", "description": "word " * 200}}
        for i in range(20)
    ]

    def compressions(rows: Any) -> dict[str, str]:
        return {name: method.decode() for name, method in rows}

    for split_before in (True, False):
        dsn = database_dsn(request, "postgresql", tmp_path, "lz4")
        engine = create_engine(await ensure_database(dsn), pool_size=2)
        try:
            await migrate(engine, "main")
            await migrate(engine, "history", "history_0005" if split_before else "head")
            await Partitions(engine).setup(TODAY)
            await migrate(engine, "history")
            record = turn([{"role": "user", "content": "which tool?"}], PARIS, 0, now=NOW)
            record.request["tools"] = tools
            await write_records(engine, record)
            async with engine.connect() as connection:
                tables = await connection.execute(
                    text(
                        "SELECT c.relname, a.attcompression FROM pg_attribute AS a "
                        "JOIN pg_class AS c ON c.oid = a.attrelid WHERE a.attname = 'params' "
                        "AND (c.relname = 'completions' OR c.oid IN (SELECT inhrelid FROM "
                        "pg_inherits WHERE inhparent = 'completions'::regclass))"
                    )
                )
                stored = await connection.scalar(
                    text("SELECT pg_column_compression(params) FROM completions")
                )
        finally:
            await engine.dispose()
        set_on = compressions(tables)
        assert len(set_on) >= 3 and set(set_on.values()) == {"l"}, set_on  # l: LZ4
        assert stored == "lz4"


async def test_three_days_of_history_read_as_one(
    engine: Any, server_dsn: str, upstream: Any, tmp_path: Path
) -> None:
    partitions = Partitions(engine)
    await partitions.setup(TODAY)
    assert await partitions.days() == [TODAY, TODAY + timedelta(days=1)]
    first = [{"role": "user", "content": "甲骨文 first day question"}]
    records = [
        turn(first, PARIS, days_ago=2),
        turn([*first, PARIS, {"role": "user", "content": "second day follow-up"}], ROME, 1),
        turn([{"role": "user", "content": "甲骨文 on its own, today"}], PARIS, days_ago=0),
        turn([{"role": "user", "content": "甲骨文 yesterday again"}], PARIS, days_ago=1),
    ]
    await write_through_the_writer(engine, partitions, records, tmp_path)
    assert await partitions.days() == [TODAY + timedelta(days=n) for n in (-2, -1, 0, 1)]

    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": server_dsn,
        "MES_DAILY_PARTITION": "true",
        "GATEWAY_ADMIN_KEY": "admin-secret",
    }
    with GatewayProcess(env, tmp_path / "gateway") as gateway:
        admin = httpx.Client(
            base_url=gateway.url + "/admin", headers={"Authorization": "Bearer admin-secret"}
        )
        listed = admin.get("/users/alice/completions", params={"limit": 2}).json()
        listed2 = admin.get(
            "/users/alice/completions", params={"limit": 2, "after": listed["last_id"]}
        ).json()
        found = admin.get("/search", params={"q": "甲骨文"}).json()
        by_day = admin.get("/stats", params={"by": "day"}).json()
        exported = admin.get("/export", params={"format": "jsonl"}).text.splitlines()
        threads = admin.get("/users/alice/conversations").json()["data"]
        longest = max(threads, key=lambda c: c["completion_count"])
        thread = admin.get(f"/conversations/{longest['id']}").json()
        # and the SQL of the gateway's own start found the tables split already
        assert httpx.get(gateway.url + "/readyz").status_code == 200

    started = [row["started_at"] for row in listed["data"] + listed2["data"]]
    assert len(started) == 4 and started == sorted(started, reverse=True)
    assert listed["has_more"] and not listed2["has_more"]
    assert len(found["data"]) == 3  # one hit a day, in three partitions
    assert [row["key"] for row in by_day["data"]] == [
        (TODAY + timedelta(days=n)).isoformat() for n in (-2, -1, 0)
    ]
    assert [row["requests"] for row in by_day["data"]] == [1, 2, 1]
    assert len(exported) == 4
    assert longest["completion_count"] == 2  # begun two days ago, continued yesterday
    assert orjson.dumps(thread).count(b"second day follow-up") >= 1
    async with engine.connect() as connection:
        row = (
            (
                await connection.execute(
                    select(completions).where(completions.c.request_message_count == 3)
                )
            )
            .mappings()
            .one()
        )
        assert await history.request_messages(connection, row) == [
            *first,
            PARIS,
            {"role": "user", "content": "second day follow-up"},
        ]


async def test_retention_drops_whole_days_and_tidies_what_they_leave(
    engine: Any, tmp_path: Path
) -> None:
    partitions = Partitions(engine)
    await partitions.setup(TODAY - timedelta(days=40))
    first = [{"role": "user", "content": "Capital of France?"}]
    records = [
        turn(first, PARIS, days_ago=40),  # a conversation begun 40 days ago ...
        turn([*first, PARIS, {"role": "user", "content": "And Italy?"}], ROME, days_ago=3),
        turn([{"role": "user", "content": "Alone, long ago"}], PARIS, days_ago=35),
    ]
    await write_through_the_writer(engine, partitions, records, tmp_path)
    metrics = Metrics()
    settings = Settings.from_env({"MES_RETENTION_DAYS": "30"})
    maintenance = Maintenance(settings, engine, engine, metrics, partitions, clock=lambda: NOW)
    dropped: dict[date, tuple[int, int]] = {}
    drop_before = partitions.drop_before

    async def watched(day: date, keep: Any = None) -> dict[date, tuple[int, int]]:
        dropped.update(await drop_before(day, keep))
        return dropped

    partitions.drop_before = watched  # type: ignore[method-assign]
    assert await maintenance.run_once()
    # The old completions went with their days' partitions, not row by row before them.
    assert sum(completions for completions, _ in dropped.values()) == 2

    days = await partitions.days()
    assert days == [TODAY - timedelta(days=3), TODAY, TODAY + timedelta(days=1)]
    assert metrics.counters["retention_completions_deleted"] == 2
    assert metrics.counters["retention_days_dropped"] == 3  # days -40, -39 and -35
    async with engine.connect() as connection:
        kept = (await connection.execute(select(completions))).mappings().one()
        assert await history.request_messages(connection, kept) == [
            *first,
            PARIS,
            {"role": "user", "content": "And Italy?"},
        ]
        conversation = (await connection.execute(select(conversations))).mappings().one()
        assert conversation["completion_count"] == 1
        assert conversation["message_count"] == 4
        assert await connection.scalar(select(func.count()).select_from(messages)) == 4
        # The usage of the days dropped went with them.
        usage = (await connection.execute(select(usage_daily.c.day, usage_daily.c.requests))).all()
        assert [tuple(row) for row in usage] == [(kept["started_at"].date(), 1)]


async def test_a_conversation_that_stays_does_not_stop_the_removal_of_those_that_go(
    engine: Any, tmp_path: Path
) -> None:
    """After the days go, conversations last active before the cutoff are removed, walking
    from the oldest. One of them may still hold a completion (one written for an old day
    meanwhile): it is tidied and kept, and the walk goes on past it."""
    partitions = Partitions(engine)
    await partitions.setup(TODAY - timedelta(days=40))
    alone = turn([{"role": "user", "content": "Alone, long ago"}], PARIS, days_ago=35)
    late = turn([{"role": "user", "content": "Written late"}], PARIS, days_ago=1)
    await write_through_the_writer(engine, partitions, [alone, late], tmp_path)
    kept_id = late.rows().conversation["id"]  # type: ignore[index]
    async with engine.begin() as connection:
        await connection.execute(
            update(conversations)
            .where(conversations.c.id == kept_id)
            .values(updated_at=NOW - timedelta(days=50))  # older than the lone one
        )
    cutoff = datetime.combine((NOW - timedelta(days=30)).date(), datetime.min.time())
    run = await retention.prune(engine, cutoff, 1, partitions)
    assert run.deleted.completions == 1
    async with engine.connect() as connection:
        left = (await connection.execute(select(conversations.c.id))).scalars().all()
        assert left == [kept_id]
        assert await connection.scalar(select(func.count()).select_from(completions)) == 1


async def test_turning_partitions_on_keeps_the_history_there_before(
    engine: Any, tmp_path: Path
) -> None:
    async with engine.begin() as connection:
        await write_batch(
            connection,
            [turn([{"role": "user", "content": f"before {n}"}], PARIS, n).rows() for n in range(5)],
        )
    partitions = Partitions(engine)
    await partitions.setup(TODAY)
    await write_through_the_writer(
        engine, partitions, [turn([{"role": "user", "content": "after"}], ROME, -1)], tmp_path
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(select(completions))).mappings().all()
        assert len(rows) == 6
        for row in rows:
            assert (await history.request_messages(connection, row))[0]["content"] in {
                *(f"before {n}" for n in range(5)),
                "after",
            }
    assert TODAY + timedelta(days=1) in await partitions.days()
    # Retention empties the history from before row by row, then drops what held it.
    run = await retention.prune(engine, NOW + timedelta(days=5), partitions=partitions)
    assert run.deleted.completions == 6
    async with engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(completions)) == 0
        assert await connection.scalar(select(func.count()).select_from(conversations)) == 0
        tables = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    assert not [name for name in tables if "legacy" in name]


async def test_a_gateway_started_with_partitions_off_again_writes_into_the_days_that_exist(
    server_dsn: str, upstream: Any, tmp_path: Path
) -> None:
    """A database split by an earlier start stays split; turning MES_DAILY_PARTITION off
    afterwards used to stall every write (retried forever, nothing stored)."""
    db = HistoryDB(server_dsn)
    try:
        for stored, flag in enumerate(("true", "false"), 1):
            env = {
                "UPSTREAM_BASE_URL": upstream.base_url,
                "SQL_DSN": server_dsn,
                "MES_DAILY_PARTITION": flag,
            }
            with GatewayProcess(env, tmp_path / flag) as gateway:
                answer = httpx.post(
                    gateway.base_url + "/chat/completions",
                    headers={"Authorization": "Bearer sk-test"},
                    json={"model": "m", "messages": [{"role": "user", "content": flag}]},
                )
                assert answer.status_code == 200, answer.text
                assert await db.wait_for("completions", stored) == stored
                assert "writing into them" in gateway.log() or flag == "true"
        async with db.engine.connect() as connection:
            assert await Partitions(db.engine).in_use()
            found = await connection.execute(select(completions.c.started_at))
            assert len(found.all()) == 2
    finally:
        await db.close()


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
async def test_partitions_turned_on_by_another_gateway_lose_no_record_of_a_running_writer(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A rolling restart that turns MES_DAILY_PARTITION on: the first gateway back splits
    the tables while the others' writers still run, with statements prepared against the
    tables as they were. (SQLite's day tables are written only by a writer that knows
    them: its gateways share one host and restart together.)"""
    dsn = database_dsn(request, kind, tmp_path, "rolling")
    async with migrated(dsn, pool_size=1) as engine:

        async def another_gateway_turns_partitions_on() -> None:
            other = create_engine(await ensure_database(dsn), pool_size=1)
            try:
                await Partitions(other).setup(datetime.now(UTC).date())
            finally:
                await other.dispose()

        await write_across(engine, tmp_path, another_gateway_turns_partitions_on)


async def test_replicas_setting_up_at_once_split_the_tables_once(server_dsn: str) -> None:
    database = await ensure_database(server_dsn)
    engines = [create_engine(database, pool_size=2) for _ in range(3)]
    try:
        await migrate(engines[0], "history")
        await asyncio.gather(*(Partitions(e).setup(TODAY) for e in engines))
        days = [await Partitions(e).days() for e in engines]
    finally:
        for e in engines:
            await e.dispose()
    assert days == [[TODAY, TODAY + timedelta(days=1)]] * 3


def test_partition_names_come_from_dates_only() -> None:
    assert partition_name("completions", date(2026, 1, 2)) == "completions_p20260102"
    hostile: list[Any] = [
        "2026-01-01; DROP TABLE completions",
        "20260101",
        datetime(2026, 1, 1, 12, 0),
        20260101,
        None,
    ]
    for value in hostile:
        with pytest.raises(TypeError):
            partition_name("completions", value)
    with pytest.raises(ValueError):
        partition_name("completions; DROP TABLE x", date(2026, 1, 1))


async def test_a_hostile_record_never_reaches_the_ddl(engine: Any, tmp_path: Path) -> None:
    """Whatever a client sends (its model, user, metadata or headers), a record's day comes
    from the gateway's clock, and a partition's name from that day alone."""
    partitions = Partitions(engine)
    await partitions.setup(TODAY)
    hostile = turn([{"role": "user", "content": "x'); DROP TABLE completions; --"}], PARIS, 0)
    hostile.request["model"] = "m_p20260101; DROP TABLE completions"
    hostile.request["user"] = "completions_p2026'); DROP TABLE messages; --"
    hostile.conversation_header = "1970-01-01'); DROP TABLE conversations; --"
    await write_through_the_writer(engine, partitions, [hostile], tmp_path)
    async with engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(completions)) == 1
        assert await connection.scalar(select(func.count()).select_from(messages)) == 2
    assert await partitions.days() == [TODAY, TODAY + timedelta(days=1)]


@pytest.mark.slow  # load: 100,000 rows
async def test_dropping_a_day_of_100000_rows_drops_its_partition_while_writes_go_on(
    engine: Any,
) -> None:
    partitions = Partitions(engine)
    await partitions.setup(TODAY - timedelta(days=40))
    old = TODAY - timedelta(days=40)
    async with engine.begin() as connection:
        await connection.execute(text(_bulk_rows(engine.dialect.name, old, 100_000)))
        assert await connection.scalar(select(func.count()).select_from(completions)) == 100_000
    writes: list[str] = []  # the records written, in order
    retried: list[BaseException] = []
    stop = asyncio.Event()

    async def keep_writing() -> None:
        n = 0
        while not stop.is_set():
            record = turn([{"role": "user", "content": f"live {n}"}], PARIS, 0, now=NOW)
            while True:  # as the writer does: what the database refuses for now, again
                try:
                    await partitions.ensure([NOW.date()])
                    async with engine.begin() as connection:
                        await write_batch(connection, [record.rows()], partitions.day_table)
                    break
                except Exception as error:
                    if not is_unavailable(error):
                        raise
                    retried.append(error)
            writes.append(record.id)
            n += 1
            await asyncio.sleep(0.005)

    # The live day's partitions are made first and the writer is under way, so that the
    # statements seen during the drop are the drop's own and the writer's ordinary ones.
    await partitions.ensure([NOW.date()])
    writer = asyncio.create_task(keep_writing())
    while len(writes) < 5 and not writer.done():  # noqa: ASYNC110 (a task of this loop)
        await asyncio.sleep(0.01)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        dropped = await partitions.drop_before(TODAY - timedelta(days=30))
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
    # Writes go on after the drop: ten more, waited for (not timed).
    before = len(writes)
    deadline = time.monotonic() + 120
    while len(writes) < before + 10 and not writer.done() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    stop.set()
    await writer
    assert dropped == {old: (100_000, 0), old + timedelta(days=1): (0, 0)}
    # The day's partition went whole: dropped, not emptied row by row (the writer's
    # statements are seen too: its MySQL recount updates conversations, not these). How
    # long the drop and the writes that meet it take is bench/ and the README's matter.
    name = partition_name("completions", old)
    assert any("DROP" in sql and name in sql for sql in statements), statements
    emptied = re.compile(r"^(DELETE FROM|UPDATE) [`\"]?(completions|request_logs|messages)", re.I)
    assert not [sql for sql in statements if emptied.match(sql)]
    assert len(writes) >= before + 10, f"{len(writes) - before} writes after the drop"
    assert len(retried) <= 2
    async with engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(completions)) == len(writes)


def _bulk_rows(kind: str, day: date, count: int) -> str:
    """One INSERT ... SELECT making ``count`` completions on ``day``, server side."""
    if kind == "sqlite":
        return (
            "WITH RECURSIVE seq(n) AS "
            f"(SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < {count}) "
            "INSERT INTO completions (id, conversation_id, owner, request_message_count, "
            "status_code, stream, started_at) SELECT 'bulk-' || n, 'conv-' || n, 'bulk', 1, 200, "
            f"0, strftime('%Y-%m-%d %H:%M:%f', '{day.isoformat()} 00:00:00', '+' || (n / 2) || "
            "' seconds') FROM seq"
        )
    if kind == "postgresql":
        return (
            "INSERT INTO completions (id, conversation_id, owner, request_message_count, "
            "status_code, stream, started_at) SELECT 'bulk-' || n, 'conv-' || n, 'bulk', 1, 200, "
            f"false, TIMESTAMP '{day.isoformat()} 00:00:00' + n * INTERVAL '1 second' / 2 "
            f"FROM generate_series(1, {count}) AS n"
        )
    return (
        "INSERT INTO completions (id, conversation_id, owner, request_message_count, "
        "status_code, stream, started_at) SELECT CONCAT('bulk-', seq), CONCAT('conv-', seq), "
        f"'bulk', 1, 200, 0, TIMESTAMP '{day.isoformat()} 00:00:00' + INTERVAL (seq DIV 2) SECOND "
        f"FROM seq_1_to_{count}"
    )
