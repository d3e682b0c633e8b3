"""A database 2 s slower on every round trip, for 60 s of steady load: every request is
answered while its record waits behind (the request path never waits on the database), the
gateway's memory stays bounded, and every record is written once the database is quick
again. The latencies are printed; how much they rise is bench/speed.py's to measure."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from tests.dbservers import DatabaseServer
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB
from tests.slow_proxy import SlowProxy
from tests.test_history_at_scale import PeakRSS

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
RATE = 20


async def timed_load(base_url: str, seconds: float, prefix: str) -> list[float]:
    """``RATE`` requests a second; each one's latency, from when it was due."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

        async def one(n: int, due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            body = {**CHAT, "user": f"{prefix}{n}", "stream": n % 2 == 0}
            response = await client.post("/chat/completions", json=body)
            response.raise_for_status()
            latencies.append(time.monotonic() - due)

        start = time.monotonic()
        await asyncio.gather(*(one(n, start + n / RATE) for n in range(int(seconds * RATE))))
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def test_a_slow_database_holds_no_request_up_and_loses_no_record(
    upstream: Any, postgres: DatabaseServer, tmp_path: Path
) -> None:
    name = postgres.new_database_name("slow")
    with SlowProxy(postgres.port) as proxy:
        dsn = postgres.url(name).replace(f":{postgres.port}/", f":{proxy.port}/")
        env = {"UPSTREAM_BASE_URL": upstream.base_url, "SQL_DSN": dsn}
        with GatewayProcess(env, tmp_path) as gateway:
            assert gateway.process is not None
            before = await timed_load(gateway.base_url, 10, "quick")
            sampler = PeakRSS(gateway.process.pid)
            baseline_rss = sampler.peak
            sampler.start()
            proxy.delay = 2.0
            during = await timed_load(gateway.base_url, 60, "slow")
            peak_rss = sampler.stop()
            ready = httpx.get(gateway.url + "/readyz").json()
            backlog, waiting = ready["spool_bytes"], ready["queue_depth"]
            proxy.delay = 0.0
            db = HistoryDB(postgres.url(name))
            try:
                total = len(before) + len(during)
                assert await db.wait_for("completions", total, timeout=120) == total
            finally:
                await db.close()
    postgres.drop_database(name)
    rise_ms = (p99(during) - p99(before)) * 1000
    growth_mib = (peak_rss - baseline_rss) / 2**20
    print(
        f"p99 {p99(before) * 1000:.1f} ms -> {p99(during) * 1000:.1f} ms (+{rise_ms:.1f} ms); "
        f"RSS +{growth_mib:.1f} MiB; {backlog} bytes spooled at the end of the slow minute"
    )
    # Every request was answered (timed_load checks each), and at the end of the slow
    # minute many of them had records not written yet: their answers did not wait for
    # their records. (A batch takes three 2 s round trips at least, while 20 requests come
    # each second; a request path that waited for its own record would leave none.)
    assert backlog > 0 and waiting >= 10, (backlog, waiting)
    assert growth_mib < 64
