"""Two gateway processes share a spool directory, each in its own slot; both are killed and
only one comes back: it writes the records of both."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


async def test_a_dead_processs_spool_slot_is_taken_over(upstream: Any, tmp_path: Path) -> None:
    history = str(tmp_path / "history.db")
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": history,
        "MES_SPOOL_DIR": str(tmp_path / "spool"),
        "MES_FLUSH_INTERVAL": "30",  # nothing is written before the kill
    }
    first = GatewayProcess(env, tmp_path / "a").start()
    second = GatewayProcess(env, tmp_path / "b").start()
    answered = []
    try:
        for n, gateway in enumerate([first, second] * 20):
            body = {**CHAT, "user": f"u{n}"}
            assert httpx.post(gateway.base_url + "/chat/completions", json=body).is_success
            answered.append(f"u{n}")
    finally:
        for gateway in (first, second):
            assert gateway.process is not None
            os.kill(gateway.process.pid, signal.SIGKILL)
            gateway.process.wait()
    slots = sorted(p.name for p in (tmp_path / "spool").glob("slot-*"))
    assert slots == ["slot-0", "slot-1"]

    with GatewayProcess({**env, "MES_FLUSH_INTERVAL": "0.05"}, tmp_path / "c") as survivor:
        db = HistoryDB(history)
        try:
            assert await db.wait_for("completions", 40) == 40
            users = Counter(row["end_user"] for row in await db.completions())
        finally:
            await db.close()
        metrics = httpx.get(survivor.url + "/metrics").text
    assert sorted(users) == sorted(answered) and set(users.values()) == {1}
    assert "mes_records_adopted_total 20" in metrics
