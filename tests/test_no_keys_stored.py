"""After 1,000 requests, no gateway key and no upstream key is anywhere the gateway writes:
not in any row of any table of its databases, not in its spool, not in its log."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

GATEWAY_KEY = "gw-secret-key-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-secret-key-fedcba9876543210"


async def test_no_key_in_any_database_row_spool_or_log_after_1000_requests(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "UPSTREAM_API_KEY": UPSTREAM_KEY,
        "GATEWAY_KEYS": GATEWAY_KEY,
        "SQL_DSN": history_dsn,
        "MES_SPOOL_DIR": str(spool),
        "LOG_LEVEL": "debug",
    }
    with GatewayProcess(env, tmp_path) as gateway:
        async with httpx.AsyncClient(
            base_url=gateway.base_url, headers={"Authorization": f"Bearer {GATEWAY_KEY}"}
        ) as client:
            gate = asyncio.Semaphore(32)

            async def one(n: int) -> int:
                body = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"question {n}"}],
                    "stream": n % 2 == 0,
                }
                headers = {"X-Fake-Status": "401"} if n % 50 == 0 else {}
                async with gate:
                    if n % 100 == 1:
                        return (await client.get("/models")).status_code
                    response = await client.post("/chat/completions", json=body, headers=headers)
                    return response.status_code

            statuses = await asyncio.gather(*(one(n) for n in range(1000)))
        db = HistoryDB(history_dsn)
        try:
            assert await db.wait_for("completions", 990) == 990
            assert await db.wait_for("request_logs", 10) == 10
            everything = await db.all_text()
        finally:
            await db.close()
        log = gateway.log()
    assert statuses.count(200) == 980 and statuses.count(401) == 20
    assert "question 999" in everything  # the dump does hold the history
    spooled = b"".join(p.read_bytes() for p in spool.rglob("*") if p.is_file())
    assert len(spooled) > 100_000
    for key in (GATEWAY_KEY, UPSTREAM_KEY):
        assert key not in everything
        assert key.encode() not in spooled
        assert key not in log
