"""A Redis stream between gateways and writers (``MES_QUEUE``): three gateway processes add
what they capture, two ``python -m gateway writer`` processes write it, through a writer
killed with ``kill -9`` and Redis killed and started again mid-load, and with Redis not
there at all when the gateway starts. Every request whose client got a whole answer is
stored exactly once, on PostgreSQL and on MariaDB."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis import Redis

from fake_upstream.testing import serve_subprocess
from storage.queue import GROUP, STREAM
from tests.conftest import database_dsn, unavailable
from tests.dbservers import RedisServer, ServerUnavailable, start_redis
from tests.gateway_process import GatewayProcess, free_port, until
from tests.raw_http import Connection
from tests.test_durability import CHAT, Load, recorded_users

pytestmark = pytest.mark.slow

RECORDS = 10_000
CONCURRENCY = 48


class QueueWriter(GatewayProcess):
    """``python -m gateway writer`` in ``workdir``, on the gateways' environment."""

    def start(self, timeout: float = 60.0) -> QueueWriter:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "writer.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "writer"],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        until(lambda: "MES writer" in self.log() or self.process.poll() is not None, timeout)
        assert self.process.poll() is None, self.log()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def _redis(base: Path, port: int | None = None, durable: bool = True) -> RedisServer:
    try:
        return start_redis(base, port, durable)
    except ServerUnavailable as error:
        unavailable(f"redis server unavailable: {error}")
        raise


@pytest.fixture(scope="module")
def fast_upstream() -> Iterator[Any]:
    """The fake upstream in a process of its own: thousands of requests, not slowed by the
    test's client sharing a process with it."""
    with serve_subprocess() as served:
        yield served


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = _redis(Path(tempfile.mkdtemp(prefix="mes-test-redis-")))
    yield server
    server.shutdown()


@pytest.fixture(params=["postgresql", "mysql"])
def server_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_dsn(request, str(request.param), tmp_path, "queued")


def holding(workdir: Path) -> int:
    """Bytes of records in the spool of the writer in ``workdir`` it has not written yet
    (and so not acknowledged either)."""
    slot = workdir / "mes_spool" / "slot-0"
    try:
        segment, offset = map(int, (slot / "checkpoint").read_text().split())
    except (FileNotFoundError, ValueError):
        segment, offset = 1, 0
    sizes = {int(p.stem.split("-")[1]): p.stat().st_size for p in slot.glob("segment-*.log")}
    return sum(size for number, size in sizes.items() if number >= segment) - offset


def _metric(gateway: GatewayProcess, name: str) -> int:
    found = re.search(rf"^{name} (\d+)", httpx.get(gateway.url + "/metrics").text, re.M)
    return int(found[1]) if found else 0


async def test_three_gateways_two_writers_a_writer_killed_and_redis_restarted(
    fast_upstream: Any, server_dsn: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {
        "UPSTREAM_BASE_URL": fast_upstream.base_url,
        "SQL_DSN": server_dsn,
        "MES_QUEUE": redis_server.url,
        "MES_QUEUE_CLAIM_SECONDS": "2",  # a dead writer's records taken over soon
        "MES_RETRY_SECONDS": "0.5",
    }
    gateways = [GatewayProcess(env, tmp_path / f"gateway-{n}") for n in range(3)]
    writers = [QueueWriter(env, tmp_path / f"writer-{n}") for n in range(2)]
    load = Load()
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in (*gateways, *writers)))

        def restart_redis() -> None:
            redis_server.kill()
            redis_server.start()

        async def send() -> None:
            """``RECORDS`` requests over ``CONCURRENCY`` connections spread over the three
            gateways; the events happen as the request numbered for them goes out."""
            numbers = iter(range(RECORDS))
            events = {3_000: kill_a_writer, 5_000: restart_redis, 7_000: writers[0].start}

            async def worker(connection: Connection) -> None:
                for n in numbers:
                    if n in events:
                        await asyncio.to_thread(events[n])
                    await one(connection, n)
                connection.close()

            await asyncio.gather(
                *(worker(Connection("127.0.0.1", gateways[c % 3].port)) for c in range(CONCURRENCY))
            )

        async def one(connection: Connection, n: int) -> None:
            name, stream = f"q{n}", n % 4 == 0
            body = orjson.dumps({**CHAT, "user": name, "stream": stream})
            try:
                status, answer = await connection.post("/v1/chat/completions", body)
            except OSError as error:
                load.failed.append((name, type(error).__name__))
                return
            whole = b"data: [DONE]" in answer if stream else b'"choices"' in answer
            if status == 200 and whole:
                load.answered.append(name)
            else:
                load.failed.append((name, f"status {status}"))

        def kill_a_writer() -> None:
            """Once it holds records read and not yet written (nor acknowledged)."""
            until(lambda: holding(writers[0].workdir), 60)
            writers[0].kill()

        await asyncio.wait_for(send(), timeout=300)
        users = await recorded_users(server_dsn, len(load.answered), timeout=240)
        assert load.failed == []
        assert len(load.answered) == RECORDS
        assert sorted(set(load.answered) - set(users)) == []  # every one
        assert set(users.values()) == {1} and len(users) == RECORDS  # once, nothing else
        # Counted once a record has been in Redis long enough to leave the spool.
        until(lambda: sum(_metric(g, "mes_records_queued_total") for g in gateways) >= RECORDS)
        assert all(_metric(g, "mes_records_dropped_total") == 0 for g in gateways)
        # Every record acknowledged in the end, and the stream trimmed behind them.
        client = Redis.from_url(redis_server.url)
        until(lambda: client.xpending(STREAM, GROUP)["pending"] == 0, 60)
        until(lambda: client.xlen(STREAM) < RECORDS // 10, 60)
        client.close()
        assert "took over" in writers[1].log() + writers[0].log()
    finally:
        for process in (*writers, *gateways):
            process.stop()


async def test_redis_unreachable_at_start_records_wait_in_the_spool(
    upstream: Any, server_dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": server_dsn,
        "MES_QUEUE": f"redis://127.0.0.1:{port}/0",
        "MES_RETRY_SECONDS": "0.5",
        "MES_STALL_SECONDS": "1",
    }
    load = Load()
    gateway = GatewayProcess(env, tmp_path / "gateway", set_up=False).start()
    writer = QueueWriter(env, tmp_path / "writer").start()  # Redis not there for it either
    server: RedisServer | None = None
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url) as client:
            for n in range(200):
                await load.one(client, f"early{n}", n % 2 == 0)
        assert load.failed == [] and len(load.answered) == 200  # served all the same

        def waiting() -> dict[str, Any] | None:
            body: dict[str, Any] = httpx.get(gateway.url + "/readyz").json()
            return body if body["writer_stalled_seconds"] > 1 else None

        body = until(waiting, 60)
        assert body["status"] == "not ready"
        assert body["queue"] == "unreachable"
        assert body["queue_depth"] == 200 and body["spool_bytes"] > 0
        assert _metric(gateway, "mes_records_queued_total") == 0

        server = _redis(Path(tempfile.mkdtemp(prefix="mes-test-redis-late-")), port)
        users = await recorded_users(server_dsn, 200, timeout=120)
        assert sorted(users) == sorted(load.answered) and set(users.values()) == {1}

        def done() -> dict[str, Any] | None:  # the records' last seconds in the spool past
            response = httpx.get(gateway.url + "/readyz")
            body: dict[str, Any] = response.json()
            return body if response.status_code == 200 and not body["spool_bytes"] else None

        body = until(done, 60)
        assert (body["status"], body["queue"], body["queue_depth"]) == ("ready", "ok", 0)
        assert _metric(gateway, "mes_records_queued_total") == 200
    finally:
        writer.stop()
        gateway.stop()
        if server is not None:
            server.shutdown()


async def test_redis_that_loses_its_last_writes_gets_them_again_from_the_gateway(
    upstream: Any, tmp_path: Path
) -> None:
    """Redis with nothing on disk, killed and started again before any writer read the
    records: the gateway still holds them (``MES_QUEUE_DURABLE_SECONDS``), sees the broken
    connection, and adds them again."""
    redis = _redis(Path(tempfile.mkdtemp(prefix="mes-test-redis-volatile-")), durable=False)
    dsn = str(tmp_path / "history.db")
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": dsn,
        "MES_QUEUE": redis.url,
        "MES_QUEUE_DURABLE_SECONDS": "3600",  # nothing leaves the spool during the test
        "MES_RETRY_SECONDS": "0.5",
    }
    load = Load()
    try:
        with GatewayProcess(env, tmp_path / "gateway") as gateway:
            async with httpx.AsyncClient(base_url=gateway.base_url) as client:
                for n in range(50):
                    await load.one(client, f"lost{n}", n % 2 == 0)
            client_redis = Redis.from_url(redis.url)
            until(lambda: client_redis.xlen(STREAM) == 50, 60)
            client_redis.close()
            redis.kill()
            redis.start()  # empty: the stream is gone
            with QueueWriter(env, tmp_path / "writer"):
                users = await recorded_users(dsn, 50, timeout=120)
            body = httpx.get(gateway.url + "/readyz").json()
        assert load.failed == [] and len(load.answered) == 50
        assert sorted(users) == sorted(load.answered) and set(users.values()) == {1}
        assert body["queue"] == "ok" and body["spool_bytes"] > 0  # still held, by design
    finally:
        redis.shutdown()
