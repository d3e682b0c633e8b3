"""A database that answers but takes no write: ``/readyz`` says so once the writer has been
stuck for ``MES_STALL_SECONDS``, ``/metrics`` says for how long, and the record goes in once
the database takes writes again."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from tests.gateway_process import GatewayProcess, until
from tests.history_db import HistoryDB


@asynccontextmanager
async def writes_blocked(db: HistoryDB, backend: str, path: str) -> AsyncIterator[None]:
    """Hold a lock that lets reads through and no write into ``completions``."""
    if backend == "sqlite":
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the one write lock SQLite has
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    async with db.engine.connect() as connection:
        if backend == "postgresql":
            await connection.execute(text("LOCK TABLE completions IN EXCLUSIVE MODE"))
        else:
            await connection.execute(text("LOCK TABLES completions READ"))
        try:
            yield
        finally:
            if backend != "postgresql":
                await connection.execute(text("UNLOCK TABLES"))
            await connection.rollback()


def readyz(gateway: GatewayProcess) -> httpx.Response:
    return httpx.get(gateway.url + "/readyz", timeout=10)


def stalled_metric(gateway: GatewayProcess) -> float:
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith("mes_writer_stalled_seconds "):
            return float(line.split()[1])
    raise AssertionError("no mes_writer_stalled_seconds in /metrics")


async def test_readyz_is_503_while_the_writer_cannot_write_and_200_once_it_can(
    backend: str, history_dsn: str, upstream: Any, tmp_path: Path
) -> None:
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": history_dsn,
        "MES_STALL_SECONDS": "1",
        "MES_RETRY_SECONDS": "0.5",
    }
    db = HistoryDB(history_dsn)
    try:
        with GatewayProcess(env, tmp_path) as gateway:
            until(lambda: readyz(gateway).status_code == 200)
            assert stalled_metric(gateway) == 0
            async with writes_blocked(db, backend, history_dsn):
                answer = httpx.post(
                    gateway.base_url + "/chat/completions",
                    headers={"Authorization": "Bearer sk-test"},
                    json={"model": "m", "messages": [{"role": "user", "content": "stuck?"}]},
                )
                assert answer.status_code == 200, answer.text  # clients never wait on it
                stalled = await asyncio.to_thread(
                    until, lambda: (r := readyz(gateway)).status_code == 503 and r.json()
                )
                assert set(stalled["databases"].values()) == {"ok"}  # it answers, yet
                assert stalled["writer_stalled_seconds"] >= 1  # MES_STALL_SECONDS, rounded
                assert stalled_metric(gateway) >= 1
            await asyncio.to_thread(until, lambda: readyz(gateway).status_code == 200)
            assert await db.wait_for("completions", 1) == 1
            assert readyz(gateway).json()["writer_stalled_seconds"] == 0
    finally:
        await db.close()
