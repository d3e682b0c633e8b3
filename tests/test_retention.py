"""Retention on every backend: old history goes in short steps, content goes before the
metadata, what remains stays whole, and one replica at a time does it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, select, text

from capture.chat import ChatExchange
from capture.exchange import RequestLog
from gateway.maintenance import ACTOR, Maintenance
from gateway.metrics import Metrics
from gateway.settings import ConfigError, Settings
from storage import accounts, history, retention
from storage.database import alembic_config, create_engine, ensure_database, migrate
from storage.locks import named_lock
from storage.schema import completions, conversations, messages, request_logs
from tests import bulk
from tests.history_db import migrated, write_records

NOW = datetime(2026, 6, 15, 12, 0, 0)


def turn(
    sent: list[dict[str, Any]],
    answer: dict[str, Any],
    days_ago: float,
    *,
    extra_choices: Sequence[dict[str, Any]] = (),
    tokens: int = 10,
    now: datetime = NOW,
) -> ChatExchange:
    choices = [{"index": 0, "message": answer, "finish_reason": "stop"}]
    choices += [
        {"index": n, "message": message, "finish_reason": "stop"}
        for n, message in enumerate(extra_choices, start=1)
    ]
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": choices,
        "usage": {"prompt_tokens": tokens, "completion_tokens": 1, "total_tokens": tokens + 1},
    }
    return ChatExchange(
        owner="alice",
        key_fingerprint=None,
        client_ip="10.0.0.1",
        user_agent="test",
        conversation_header=None,
        request={"model": "m", "messages": sent},
        stream=False,
        started_at=now - timedelta(days=days_ago),
        status=200,
        response_body=orjson.dumps(body),
        latency_ms=12.0,
    )


def log_row(days_ago: float) -> RequestLog:
    return RequestLog(
        owner="alice",
        key_fingerprint=None,
        client_ip="10.0.0.1",
        user_agent="test",
        method="GET",
        path="/v1/models",
        status=200,
        started_at=NOW - timedelta(days=days_ago),
        latency_ms=1.0,
        bytes_in=0,
        bytes_out=10,
    )


@pytest.fixture
async def engine(history_dsn: str) -> AsyncIterator[Any]:
    async with migrated(history_dsn, pool_size=2) as engine:
        yield engine


def maintenance(engine: Any, **env: str) -> tuple[Maintenance, Metrics]:
    metrics = Metrics()
    settings = Settings.from_env({"MES_RETENTION_STEP": "2", **env})
    return Maintenance(settings, engine, engine, metrics, clock=lambda: NOW), metrics


SYSTEM = {"role": "system", "content": "Answer in one word."}
FIRST = {"role": "user", "content": "Capital of France?"}
PARIS = {"role": "assistant", "content": "Paris."}
SECOND = {"role": "user", "content": "And of Italy?"}
ROME = {"role": "assistant", "content": "Rome."}


async def test_retention_removes_old_turns_and_every_kept_completion_still_rebuilds(
    engine: Any,
) -> None:
    """A conversation begun 40 days ago and continued 10 days ago, with 30 days of
    retention: its first turn goes, its second keeps every message it resent; a
    conversation wholly older goes with its messages; old request logs go."""
    kept_request = [SYSTEM, FIRST, PARIS, SECOND]
    await write_records(
        engine,
        turn([SYSTEM, FIRST], PARIS, days_ago=40),
        turn(kept_request, ROME, days_ago=10, tokens=30),
        turn([{"role": "user", "content": "Old and alone"}], PARIS, days_ago=35),
        log_row(40),
        log_row(1),
    )
    gateway, metrics = maintenance(engine, MES_RETENTION_DAYS="30")
    assert await gateway.run_once()

    async with engine.connect() as connection:
        rows = (await connection.execute(select(completions))).mappings().all()
        assert len(rows) == 1 and rows[0]["prompt_tokens"] == 30
        assert await history.request_messages(connection, rows[0]) == kept_request
        assert await history.answer_message(connection, rows[0]) == ROME
        conversation = (await connection.execute(select(conversations))).mappings().one()
        assert conversation["id"] == rows[0]["conversation_id"]
        assert (conversation["completion_count"], conversation["total_tokens"]) == (1, 31)
        assert conversation["message_count"] == 5
        assert await connection.scalar(select(func.count()).select_from(messages)) == 5
        logs = (await connection.execute(select(request_logs.c.started_at))).scalars().all()
        assert logs == [NOW - timedelta(days=1)]
        audit = await accounts.list_audit(connection, 10, None)
    assert metrics.counters["retention_completions_deleted"] == 2
    assert metrics.counters["retention_request_logs_deleted"] == 1
    assert [(a["actor"], a["action"]) for a in audit] == [(ACTOR, "history.pruned")]
    assert orjson.loads(audit[0]["details"]) == {
        "older_than_days": 30,
        "completions": 2,
        "conversations": 1,
        "messages": 2,  # the lone conversation's two; the kept one loses none it resends
        "request_logs": 1,
    }
    assert await gateway.run_once()  # a second round finds nothing more to do
    async with engine.connect() as connection:
        assert len(await accounts.list_audit(connection, 10, None)) == 1


async def test_the_prune_commits_in_short_steps(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3,000 old conversations, removed 100 at a time, each step a transaction of its own;
    then 3,000 more while a writer stores new turns: the writer's turns go in between the
    steps, never after the whole prune (one transaction for it all would hold them, on
    SQLite's one write lock). How long a step takes is bench/'s and the README's matter."""
    events: list[str] = []
    real_step = retention.prune_step

    async def step(*args: Any) -> Any:
        done = await real_step(*args)
        events.append("step")
        return done

    monkeypatch.setattr(retention, "prune_step", step)
    await bulk.fill(engine, 3000)
    cutoff = datetime.now(UTC).replace(tzinfo=None)
    alone = await retention.prune(engine, cutoff, step=100)
    assert alone.deleted.completions == 3000 and alone.deleted.conversations == 3000
    assert alone.deleted.messages == 6000
    assert alone.steps >= 30 and events.count("step") == alone.steps

    await bulk.fill(engine, 3000, owner="second")
    events.clear()

    async def keep_writing() -> None:
        for n in range(200):
            new = turn([{"role": "user", "content": f"new {n}"}], PARIS, -1, now=cutoff)
            await write_records(engine, new)
            events.append("write")
            await asyncio.sleep(0.002)

    writer = asyncio.create_task(keep_writing())
    shared = await retention.prune(engine, cutoff, step=100)
    await writer
    assert shared.deleted.completions == 3000 and shared.steps >= 30
    async with engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(completions)) == 200
    steps = [index for index, event in enumerate(events) if event == "step"]
    between = [i for i, event in enumerate(events) if event == "write" and steps[0] < i < steps[-1]]
    # writes went in while the prune went on, in more than one gap between its steps
    assert between, events
    assert len({sum(1 for s in steps if s < i) for i in between}) > 1, events


async def test_content_retention_drops_what_was_said_and_keeps_the_metadata(
    engine: Any,
) -> None:
    weather_call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    }
    old = turn(
        [SYSTEM, {"role": "user", "content": "Weather in Oslo, secret plan B?"}],
        weather_call,
        days_ago=10,
        extra_choices=[{"role": "assistant", "content": "Second choice, secret plan C"}],
    )
    recent = turn([{"role": "user", "content": "What is new today?"}], PARIS, days_ago=1)
    await write_records(engine, old, recent)
    gateway, metrics = maintenance(engine, MES_RETENTION_DAYS="30", MES_CONTENT_RETENTION_DAYS="7")
    assert await gateway.run_once()
    assert metrics.counters["retention_contents_dropped"] == 3

    async with engine.connect() as connection:
        rows = {
            row["started_at"]: row
            for row in (await connection.execute(select(completions))).mappings()
        }
        gone = rows[NOW - timedelta(days=10)]
        assert await history.request_messages(connection, gone) == [
            {"role": "system", "content": None},
            {"role": "user", "content": None},
        ]
        assert await history.answer_message(connection, gone) == {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
        }
        assert gone["extra_choices"] is None
        assert (gone["prompt_tokens"], gone["latency_ms"], gone["client_ip"]) == (
            10,
            12.0,
            "10.0.0.1",
        )
        kept = rows[NOW - timedelta(days=1)]
        assert await history.request_messages(connection, kept) == [
            {"role": "user", "content": "What is new today?"}
        ]
        titles = dict(
            (await connection.execute(select(conversations.c.id, conversations.c.title))).all()
        )
        assert titles[gone["conversation_id"]] is None
        assert titles[kept["conversation_id"]] == "What is new today?"
        everything = repr((await connection.execute(text("SELECT * FROM messages"))).all())
        everything += repr((await connection.execute(text("SELECT * FROM completions"))).all())
    assert "secret plan" not in everything and "Oslo" not in everything


async def test_one_replica_at_a_time_runs_maintenance(engine: Any) -> None:
    await write_records(engine, turn([FIRST], PARIS, days_ago=40))
    first, _ = maintenance(engine, MES_RETENTION_DAYS="30")
    second, _ = maintenance(engine, MES_RETENTION_DAYS="30")
    async with named_lock(engine, "mes-maintenance", wait=False) as held:
        assert held
        assert not await second.run_once()  # the lock is taken: it skips its turn
        async with engine.connect() as connection:
            assert await connection.scalar(select(func.count()).select_from(completions)) == 1
    assert await first.run_once()
    async with engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(completions)) == 0


async def test_replicas_that_start_together_migrate_once(history_dsn: str) -> None:
    """Four processes' engines migrate one fresh database at the same moment: each waits
    for the one migrating, and all find the schema complete."""
    database = await ensure_database(history_dsn)
    engines = [create_engine(database, pool_size=2) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate(engine, "history") for engine in engines))
        await asyncio.gather(*(migrate(engine, "main") for engine in engines))
        async with engines[0].connect() as connection:
            versions = (
                (await connection.execute(text("SELECT version_num FROM alembic_version_history")))
                .scalars()
                .all()
            )
            assert await connection.scalar(select(func.count()).select_from(completions)) == 0
    finally:
        for engine in engines:
            await engine.dispose()
    assert versions == [ScriptDirectory.from_config(alembic_config("history")).get_current_head()]


def test_content_retention_must_be_shorter_than_retention() -> None:
    with pytest.raises(ConfigError, match="MES_CONTENT_RETENTION_DAYS"):
        Settings.from_env({"MES_RETENTION_DAYS": "7", "MES_CONTENT_RETENTION_DAYS": "7"})
    settings = Settings.from_env({"MES_CONTENT_RETENTION_DAYS": "7"})
    assert (settings.content_retention_days, settings.mes_retention_days) == (7, 0)


async def test_the_gateway_prunes_on_schedule(upstream: Any, tmp_path: Any) -> None:
    """A gateway started with MES_RETENTION_DAYS prunes as soon as its databases are
    ready, and says so in /metrics and in the audit log."""
    from tests.gateway_process import GatewayProcess
    from tests.history_db import HistoryDB

    dsn = str(tmp_path / "mes_gateway.db")
    seeded = create_engine(await ensure_database(dsn), pool_size=1)
    await migrate(seeded, "history")
    await bulk.fill(seeded, 50)  # 30 days old and less: 20 s apart
    await seeded.dispose()
    env = {"UPSTREAM_BASE_URL": upstream.base_url, "MES_RETENTION_DAYS": "29"}
    with GatewayProcess(env, tmp_path) as gateway:
        db = HistoryDB(dsn)
        try:
            deadline = time.monotonic() + 30
            # Done when the prune has said so in the audit log (after its last step).
            while not await db.count("audit_log") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert await db.count("completions") == 0
            assert await db.count("conversations") == 0
            audit = await db.rows(text("SELECT actor, action FROM audit_log"))
        finally:
            await db.close()
        metrics = httpx.get(gateway.url + "/metrics").text
    assert "mes_retention_completions_deleted_total 50" in metrics
    assert [(row["actor"], row["action"]) for row in audit] == [(ACTOR, "history.pruned")]
