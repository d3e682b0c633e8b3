"""Upgrading a history database written by an earlier revision keeps every record readable."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from capture.chain import canonical, chain, content_text
from storage import history, usage
from storage.database import create_engine, ensure_database, migrate
from storage.schema import completions, conversations, messages
from storage.scope import Scope
from tests.conftest import database_dsn

REPO = Path(__file__).resolve().parent.parent
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
REQUEST = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Describe"}, IMAGE]},
    {"role": "user", "content": "and answer in 中文", "name": "kim"},
]
ANSWER = {"role": "assistant", "content": "一只猫。", "refusal": None, "annotations": []}


def earlier_failure(now: datetime, request_hash: str) -> dict[str, Any]:
    """A completion of the day before that failed, with a model, tokens and a latency."""
    return {
        "id": "r0",
        "conversation_id": "c1",
        "owner": "alice",
        "requested_model": "gpt-4o",
        "request_hash": request_hash,
        "request_message_count": len(REQUEST),
        "status_code": 500,
        "stream": False,
        "started_at": now - timedelta(days=1),
        "prompt_tokens": 12,
        "total_tokens": 12,
        "latency_ms": 812.5,
    }


def first_revision_rows(now: datetime) -> tuple[list[dict[str, Any]], str, str]:
    """Message rows exactly as revision history_0001 wrote them: the whole JSON in body."""
    rows: list[dict[str, Any]] = []
    request_hash = tail = ""
    for digest, parent, message in chain([*REQUEST, ANSWER]):
        rows.append(
            {
                "conversation_id": "c1",
                "hash": digest,
                "parent_hash": parent or None,
                "role": message["role"],
                "body": canonical(message).decode(),
                "content_text": content_text(message),
                "created_at": now,
            }
        )
        request_hash, tail = tail, digest
    return rows, request_hash, tail


async def test_history_from_the_first_revision_reads_back_the_same_after_upgrading(
    history_dsn: str,
) -> None:
    engine = create_engine(await ensure_database(history_dsn), pool_size=1)
    try:
        await migrate(engine, "history", "history_0001")
        now = datetime.now(UTC).replace(tzinfo=None)
        rows, request_hash, answer_hash = first_revision_rows(now)
        totals = {"completion_count": 1, "message_count": 4}
        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        async with engine.begin() as connection:
            await connection.execute(
                insert(conversations),
                {"id": "c1", "owner": "alice", "created_at": now, "updated_at": now}
                | totals
                | zero,
            )
            await connection.execute(insert(messages), rows)
            await connection.execute(
                insert(completions),
                {
                    "id": "r1",
                    "conversation_id": "c1",
                    "owner": "alice",
                    "request_hash": request_hash,
                    "request_message_count": len(REQUEST),
                    "response_hash": answer_hash,
                    "status_code": 200,
                    "stream": False,
                    "started_at": now,
                },
            )
            await connection.execute(insert(completions), earlier_failure(now, request_hash))
            shouted = earlier_failure(now, request_hash) | {"id": "r2", "requested_model": "GPT-4o"}
            await connection.execute(insert(completions), shouted)

        await migrate(engine, "history")

        async with engine.connect() as connection:
            query = select(completions).where(completions.c.id == "r1")
            row = (await connection.execute(query)).mappings().one()
            assert await history.request_messages(connection, row) == REQUEST
            assert await history.answer_message(connection, row) == ANSWER
            flags = (await connection.execute(select(messages.c.content_in_text))).scalars()
            assert list(flags) == [False] * 4
            # The usage by day is filled from the completions there before it.
            by_day = await usage.daily_usage(connection, Scope.everyone(), "day")
            assert [(g["key"], g["requests"], g["errors"], g["total_tokens"]) for g in by_day] == [
                (str(now.date() - timedelta(days=1)), 2, 2, 24),
                (str(now.date()), 1, 0, 0),
            ]
            by_model = await usage.daily_usage(connection, Scope.of("alice"), "model")
            # MySQL's collation finds "GPT-4o" and "gpt-4o" one model, as its GROUP BY does.
            keys = [g["key"] for g in by_model]
            if connection.dialect.name == "mysql":
                assert [key and key.lower() for key in keys] == [None, "gpt-4o"]
            else:
                assert keys == [None, "GPT-4o", "gpt-4o"]
            assert sum(g["requests"] for g in by_model) == 3
            assert by_model[-1]["latency_p50_ms"] == pytest.approx(812.5, rel=usage.HALF_BUCKET)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("target", ["main", "history"])
def test_the_newest_revision_is_alembics_head(target: str) -> None:
    from alembic.script import ScriptDirectory

    from storage.database import alembic_config, newest_revision

    heads = ScriptDirectory.from_config(alembic_config(target)).get_heads()
    assert heads == [newest_revision(target)]


def test_a_start_on_an_up_to_date_database_does_not_load_alembic(tmp_path: Any) -> None:
    """The first start migrates; the next ones read the version and go on, without Alembic."""
    script = f"""
import asyncio, sys
from storage.database import create_engine, ensure_database, migrate
async def main():
    engine = create_engine(await ensure_database({str(tmp_path / "h.db")!r}))
    for target in ("main", "history"):
        await migrate(engine, target)
    await engine.dispose()
asyncio.run(main())
print("alembic" in sys.modules)
"""
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.strip()
        for _ in range(2)
    ]
    assert runs == ["True", "False"]


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
async def test_processes_creating_one_database_at_once_all_find_it_made(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path
) -> None:
    """A gateway and its writer process on one DSN, or replicas started together, create a
    database that does not exist yet at the same moment: each goes on with it made (on
    PostgreSQL, the one that lost an overlapping CREATE DATABASE got a unique violation,
    not "already exists", and its gateway stayed not ready for another backoff step)."""
    for round_ in range(5):
        dsn = database_dsn(request, kind, tmp_path, f"race{round_}")
        await asyncio.gather(*(ensure_database(dsn) for _ in range(3)))
        engine = create_engine(await ensure_database(dsn), pool_size=1)
        try:
            async with engine.connect() as connection:
                assert (await connection.exec_driver_sql("SELECT 1")).scalar() == 1
        finally:
            await engine.dispose()
