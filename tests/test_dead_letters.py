"""A record the database refuses for good goes to the dead letters, where an admin can list
it, and does not hold back the records written with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from storage.database import create_engine, ensure_database, migrate
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB
from tests.managed import ADMIN, ADMIN_KEY

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


async def test_a_refused_record_is_dead_lettered_and_the_others_written(
    upstream: Any, tmp_path: Path
) -> None:
    dsn = str(tmp_path / "history.db")
    engine = create_engine(await ensure_database(dsn), pool_size=1)
    try:
        await migrate(engine, "history")
        async with engine.begin() as connection:  # a database that refuses one end user
            await connection.execute(
                text(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON completions "
                    "WHEN NEW.end_user = 'poison' "
                    "BEGIN SELECT RAISE(ABORT, 'poison is refused'); END"
                )
            )
    finally:
        await engine.dispose()
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": dsn,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "MES_FLUSH_INTERVAL": "0.5",  # the poison arrives in one batch with the others
    }
    with GatewayProcess(env, tmp_path) as gateway:
        with httpx.Client(base_url=gateway.base_url) as client:
            for user in ("a", "b", "poison", "c", "d"):
                assert client.post("/chat/completions", json={**CHAT, "user": user}).is_success
        db = HistoryDB(dsn)
        try:
            assert await db.wait_for("completions", 4) == 4
            written = sorted(row["end_user"] for row in await db.completions())
        finally:
            await db.close()
        listed = httpx.get(gateway.url + "/admin/dead-letters", headers=ADMIN).json()
        metrics = httpx.get(gateway.url + "/metrics").text
    assert written == ["a", "b", "c", "d"]
    (letter,) = listed["data"]
    assert letter["record"]["request"]["user"] == "poison"
    assert "poison is refused" in letter["reason"]
    assert "mes_records_dead_lettered_total 1" in metrics
    assert "mes_records_dropped_total 0" in metrics
