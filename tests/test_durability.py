"""Never lose a record: the database stopped or killed under load, the gateway started with
its database down, the gateway killed with ``kill -9`` or stopped with SIGTERM mid-load.
Every request whose client got a whole answer has its record afterwards, exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import unavailable
from tests.dbservers import DatabaseServer, start_mariadb, start_postgres
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Load:
    """Requests sent on a schedule; which ones came back whole, and which failed."""

    answered: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    async def one(self, client: httpx.AsyncClient, name: str, stream: bool) -> None:
        try:
            if stream:
                async with client.stream(
                    "POST", "/chat/completions", json={**CHAT, "user": name, "stream": True}
                ) as response:
                    text = "".join([line async for line in response.aiter_lines()])
                    whole = response.status_code == 200 and "data: [DONE]" in text
            else:
                response = await client.post("/chat/completions", json={**CHAT, "user": name})
                whole = response.status_code == 200 and bool(response.json()["choices"])
        except httpx.HTTPError as error:
            self.failed.append((name, type(error).__name__))
            return
        if whole:
            self.answered.append(name)
        else:
            self.failed.append((name, f"status {response.status_code}"))

    async def steady(
        self, base_url: str, rate: float, seconds: float, events: dict[float, Callable[[], Any]]
    ) -> None:
        """``rate`` requests a second for ``seconds``; ``events[t]`` runs at second ``t``."""
        async with httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": "Bearer sk-load"}, timeout=30
        ) as client:
            tasks = []
            start = time.monotonic()
            pending = sorted(events.items())
            for n in range(int(rate * seconds)):
                due = start + n / rate
                while pending and pending[0][0] <= n / rate:
                    await asyncio.to_thread(pending.pop(0)[1])
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                tasks.append(asyncio.create_task(self.one(client, f"r{n}", n % 2 == 0)))
            await asyncio.gather(*tasks)


async def recorded_users(dsn: str, at_least: int, timeout: float = 90) -> Counter[str]:
    db = HistoryDB(dsn)
    try:
        await db.wait_for("completions", at_least, timeout=timeout)
        return Counter(row["end_user"] for row in await db.completions())
    finally:
        await db.close()


@pytest.fixture(params=["postgresql", "mysql"])
def own_server(request: pytest.FixtureRequest) -> Any:
    """A database server of the test's own, to stop and kill without disturbing others,
    configured to keep what it commits (as the servers' defaults do)."""
    kind = request.param
    starter = start_postgres if kind == "postgresql" else start_mariadb
    try:
        server = starter(Path(tempfile.mkdtemp(prefix=f"mes-test-durable-{kind}-")), durable=True)
    except Exception as error:  # binaries missing
        unavailable(f"{kind} server unavailable: {error}")
    yield kind, server
    server.shutdown()


async def test_the_database_down_30s_under_steady_load_loses_nothing(
    upstream: Any, own_server: tuple[str, DatabaseServer], tmp_path: Path
) -> None:
    """PostgreSQL stopped with ``-m immediate``, MariaDB killed with SIGKILL, for 30 s of a
    60 s load at 20 requests a second."""
    kind, server = own_server
    dsn = server.url("durable")
    env = {"UPSTREAM_BASE_URL": upstream.base_url, "SQL_DSN": dsn, "MES_RETRY_SECONDS": "1"}
    load = Load()
    how = "immediate" if kind == "postgresql" else "kill"
    with GatewayProcess(env, tmp_path) as gateway:
        await load.steady(
            gateway.base_url, 20, 60, {15.0: lambda: server.stop(how), 45.0: server.start}
        )
        users = await recorded_users(dsn, len(load.answered))
        metrics = httpx.get(gateway.url + "/metrics").text
    values = dict(line.split() for line in metrics.splitlines() if line.startswith("mes_"))
    assert load.failed == []
    assert len(load.answered) == 1200
    missing = sorted(set(load.answered) - set(users))
    assert missing == [], (missing, values)  # every one
    assert set(users.values()) == {1}  # once
    assert values["mes_records_dropped_total"] == "0"
    assert int(values["mes_write_retries_total"]) > 0  # it did notice the outage


async def test_a_gateway_started_with_its_database_down_serves_and_writes_later(
    upstream: Any, tmp_path: Path
) -> None:
    try:
        server = start_postgres(Path(tempfile.mkdtemp(prefix="mes-test-late-")))
    except Exception as error:
        unavailable(f"postgresql server unavailable: {error}")
    try:
        dsn = server.url("late")
        server.stop("immediate")
        env = {"UPSTREAM_BASE_URL": upstream.base_url, "SQL_DSN": dsn, "MES_RETRY_SECONDS": "1"}
        load = Load()
        with GatewayProcess(env, tmp_path) as gateway:
            async with httpx.AsyncClient(base_url=gateway.base_url) as client:
                for n in range(30):
                    await load.one(client, f"early{n}", n % 2 == 0)
            not_ready = httpx.get(gateway.url + "/readyz")
            server.start()
            users = await recorded_users(dsn, 30)
            # The writer retries every MES_RETRY_SECONDS; the main database's set-up backs
            # off on its own (up to 10 s): ready soon after the records, not at once.
            deadline = time.monotonic() + 30
            ready = httpx.get(gateway.url + "/readyz")
            while ready.status_code != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                ready = httpx.get(gateway.url + "/readyz")
    finally:
        server.shutdown()
    assert load.failed == [] and len(load.answered) == 30
    assert not_ready.status_code == 503 and not_ready.json()["spool_bytes"] > 0
    assert ready.status_code == 200
    assert sorted(users) == sorted(load.answered) and set(users.values()) == {1}


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_the_gateway_stopped_mid_load_keeps_every_answered_record(
    upstream: Any, history_dsn: str, tmp_path: Path, how: str
) -> None:
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": history_dsn,
        "MES_SPOOL_DIR": str(tmp_path / "spool"),
        # Records wait a while before they are written: many are only in the spool when
        # the gateway goes.
        "MES_FLUSH_INTERVAL": "1.5",
        "GATEWAY_SHUTDOWN_GRACE": "0.2",
    }
    load = Load()
    gateway = GatewayProcess(env, tmp_path).start()

    def stop() -> None:  # due after 200 requests; once 150 are answered, on a slow machine
        deadline = time.monotonic() + 30
        while len(load.answered) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)  # a thread: the requests in flight go on meanwhile
        assert gateway.process is not None
        if how == "kill -9":
            os.kill(gateway.process.pid, signal.SIGKILL)
        else:
            gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(30)

    try:
        await load.steady(gateway.base_url, 100, 3, {2.0: stop})
    finally:
        gateway.stop()
    assert len(load.answered) >= 150  # the load did run before the stop
    with GatewayProcess(env, tmp_path):  # the same spool: it writes what is left
        users = await recorded_users(history_dsn, len(load.answered))
    assert set(load.answered) <= set(users)
    assert set(users.values()) == {1}
