"""Capture stays off the request path: client disconnects, conversations, a database outage."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fake_upstream.responses import content_pieces
from tests.conftest import unavailable
from tests.dbservers import DatabaseServer, start_postgres
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "tell me a story"}]}


def fake_stats(upstream: Any) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(upstream.root + "/_fake/stats").json()
    return stats


async def test_a_client_leaving_mid_stream_cancels_the_upstream_and_keeps_the_partial_answer(
    upstream: Any, tmp_path: Path
) -> None:
    httpx.delete(upstream.root + "/_fake/requests")
    slow = {"X-Fake-Chunks": "200", "X-Fake-Chunk-Delay": "0.05", "Authorization": "Bearer sk-a"}
    with GatewayProcess({"UPSTREAM_BASE_URL": upstream.base_url}, tmp_path) as gateway:
        async with httpx.AsyncClient(base_url=gateway.base_url) as client:
            async with client.stream(
                "POST", "/chat/completions", headers=slow, json={**CHAT, "stream": True}
            ) as response:
                seen = 0
                async for line in response.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 4:
                        break
        # Left alone, the upstream would send all 200 chunks (10 s) and count the stream
        # completed; cancelled, it counts it abandoned. Whichever comes first says which.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = fake_stats(upstream)
            if stats["streams_abandoned"] or stats["streams_completed"]:
                break
            await asyncio.sleep(0.05)
        assert fake_stats(upstream) == {
            "streams_started": 1,
            "streams_completed": 0,
            "streams_abandoned": 1,
        }
        db = HistoryDB(str(tmp_path / "mes_gateway.db"))
        try:
            assert await db.wait_for("completions", 1) == 1
            (row,) = await db.completions()
            _, answer = await db.request_and_answer(row)
        finally:
            await db.close()
    assert row["finish_reason"] == "client_disconnected"
    assert row["status_code"] == 200
    assert answer["content"].startswith("Echo: tell me a story")
    whole = "".join(content_pieces({**CHAT, "stream": True}, 200))
    assert whole.startswith(answer["content"]) and len(answer["content"]) < len(whole)


async def test_a_conversation_header_groups_completions_per_caller(
    upstream: Any, tmp_path: Path
) -> None:
    with GatewayProcess({"UPSTREAM_BASE_URL": upstream.base_url}, tmp_path) as gateway:
        for key in ("sk-alice", "sk-alice", "sk-bob"):
            response = httpx.post(
                gateway.base_url + "/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {key}", "X-Conversation-Id": "trip-planning"},
            )
            assert response.status_code == 200
        db = HistoryDB(str(tmp_path / "mes_gateway.db"))
        try:
            assert await db.wait_for("completions", 3) == 3
            rows = await db.completions()
            conversations = await db.count("conversations")
        finally:
            await db.close()
    by_owner: dict[str, set[str]] = {}
    for row in rows:
        by_owner.setdefault(row["owner"], set()).add(row["conversation_id"])
    assert sorted(len(ids) for ids in by_owner.values()) == [1, 1]
    alice, bob = by_owner.values()
    assert alice != bob  # the same name, two callers: two conversations
    assert conversations == 2


@pytest.fixture
def own_postgres() -> Any:
    """A PostgreSQL server of this test's own, to stop without disturbing the others."""
    try:
        server = start_postgres(Path(tempfile.mkdtemp(prefix="mes-test-outage-")))
    except Exception as error:  # binaries missing
        unavailable(f"postgresql server unavailable: {error}")
    yield server
    server.shutdown()


async def test_a_database_outage_neither_fails_nor_slows_requests(
    upstream: Any, own_postgres: DatabaseServer, tmp_path: Path
) -> None:
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": own_postgres.url("outage"),
        "MES_RETRY_SECONDS": "3",
    }

    async def requests(client: httpx.AsyncClient, count: int) -> None:
        for index in range(count):
            response = await client.post(
                "/chat/completions", json={**CHAT, "user": f"u{index}", "stream": index % 2 == 0}
            )
            assert response.status_code == 200

    with GatewayProcess(env, tmp_path) as gateway:
        async with httpx.AsyncClient(
            base_url=gateway.base_url, headers={"Authorization": "Bearer sk-x"}
        ) as client:
            await requests(client, 30)
            deadline = time.monotonic() + 10
            while "mes_records_written_total 30" not in httpx.get(gateway.url + "/metrics").text:
                assert time.monotonic() < deadline, "the healthy phase was not written"
                await asyncio.sleep(0.05)
            own_postgres.stop("immediate")
            await requests(client, 60)
            ready = httpx.get(gateway.url + "/readyz")
            deadline = time.monotonic() + 60
            while "mes_write_retries_total 0" in httpx.get(gateway.url + "/metrics").text:
                assert time.monotonic() < deadline, "the writer never retried"
                await asyncio.sleep(0.05)
            metrics = httpx.get(gateway.url + "/metrics").text
    assert ready.status_code == 503
    assert ready.json()["databases"]["main"].startswith("unreachable")
    # The request path never waits for the database: all 60 answered while none of their
    # records could be written (how long they took is bench/speed.py's to measure).
    assert ready.json()["queue_depth"] == 60
    values = dict(line.split() for line in metrics.splitlines() if line.startswith("mes_"))
    assert int(values["mes_records_written_total"]) == 30
    # Nothing given up: the records wait in the spool (tests/test_durability.py shows them
    # written once the database is back).
    assert int(values["mes_write_retries_total"]) >= 1
    assert values["mes_records_dropped_total"] == "0"
    assert values["mes_records_failed_total"] == "0"
    assert int(values["mes_records_captured_total"]) == 90
    assert int(values["mes_spool_bytes"]) > 0


def children(pid: int) -> list[int]:
    return [int(n) for n in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_the_writer_runs_beside_the_gateway_and_is_restarted_when_it_dies(
    upstream: Any, tmp_path: Path
) -> None:
    """The history writer is a child process of its gateway: killed, it is started again and
    what was spooled meanwhile is written; the gateway killed, its writer goes with it. It
    runs at a lower CPU priority than its gateway (``MES_WRITER_NICE``, 10 by default)."""
    dsn = str(tmp_path / "history.db")
    env = {"UPSTREAM_BASE_URL": upstream.base_url, "MES_SQLITE_PATH": dsn}
    prompt = "lorem ipsum dolor sit amet " * 800  # ~20 KB
    database = HistoryDB(dsn)
    gateway = GatewayProcess(env, tmp_path).start()
    try:
        assert gateway.process is not None
        (writer,) = children(gateway.process.pid)
        async with httpx.AsyncClient(
            base_url=gateway.base_url, headers={"Authorization": "Bearer sk-x"}
        ) as client:
            for index in range(40):
                if index == 20:
                    os.kill(writer, signal.SIGKILL)
                body = {**CHAT, "messages": [{"role": "user", "content": f"{index} {prompt}"}]}
                response = await client.post("/chat/completions", json=body)
                assert response.status_code == 200
            assert await database.wait_for("completions", 40, timeout=30) == 40
            rows = await database.completions()
            # All written: the spool holds nothing, as the gateway counts it (the killed
            # writer's last release may never have been reported: counted again from disk).
            deadline = time.monotonic() + 10
            while True:
                metrics = httpx.get(gateway.url + "/metrics").text
                if "\nmes_spool_bytes 0\n" in metrics:
                    break
                assert time.monotonic() < deadline, "the spool's size never came back to 0"
                await asyncio.sleep(0.05)
            (restarted,) = children(gateway.process.pid)
            # It has written since it started: past setting its priority.
            niceness = os.getpriority(os.PRIO_PROCESS, restarted)
            gateway_niceness = os.getpriority(os.PRIO_PROCESS, gateway.process.pid)
        os.kill(gateway.process.pid, signal.SIGKILL)
        gateway.process.wait()
        deadline = time.monotonic() + 5
        while alive(restarted) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        gateway.stop()
        await database.close()
    assert restarted != writer
    assert niceness == min(19, gateway_niceness + 10)
    assert not alive(restarted), "the writer outlived its gateway"
    assert "writer process exited" in gateway.log()
    assert len({row["id"] for row in rows}) == 40
    values = dict(line.split() for line in metrics.splitlines() if line.startswith("mes_"))
    assert int(values["mes_records_captured_total"]) == 40
    # the writers' counters, reported by the gateway (a batch the killed writer wrote but did
    # not mark written is written again by the next, and counted again)
    assert int(values["mes_records_written_total"]) >= 40
