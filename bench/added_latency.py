"""What the gateway adds to a request: latency through the gateway against the direct fake
upstream, measured interleaved in the same run (closed loop, keep-alive connections).

Starts the fake upstream and one gateway worker (capture on, SQLite history, spool on);
sends rounds of requests alternately to the upstream and to the gateway; prints per mode
(non-streamed, streamed: time to first byte and to the end) and concurrency: median and p99
for both, and what the gateway adds. A first look for issue 6, not its suite (no wrk, no
open-loop generator yet).

    python bench/added_latency.py [--requests 2000] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_upstream.testing import serve_subprocess  # noqa: E402
from tests.gateway_process import GatewayProcess  # noqa: E402

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}


async def measure(base_url: str, count: int, concurrency: int, stream: bool) -> list[float]:
    """Per request, seconds to the end (non-streamed) or to the first byte (streamed)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    times: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        queue = iter(range(count))

        async def worker() -> None:
            for n in queue:
                body = {**BODY, "user": f"u{n}", "stream": stream}
                started = time.perf_counter()
                async with client.stream(
                    "POST", "/chat/completions", json=body, headers={"Authorization": "Bearer sk"}
                ) as response:
                    async for _ in response.aiter_raw():
                        if stream:
                            times.append(time.perf_counter() - started)
                            break
                if not stream:
                    times.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return times


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def run(upstream: str, gateway: str, count: int, levels: list[int]) -> None:
    print(
        f"{'mode':<22}{'conc':>5}{'direct p50':>12}{'gw p50':>9}{'added':>8}"
        f"{'direct p99':>12}{'gw p99':>9}{'added':>8}   ms"
    )
    for stream in (False, True):
        for concurrency in levels:
            await measure(upstream, 200, concurrency, stream)  # warm both
            await measure(gateway, 200, concurrency, stream)
            direct: list[float] = []
            through: list[float] = []
            for _ in range(5):  # interleaved rounds
                direct += await measure(upstream, count // 5, concurrency, stream)
                through += await measure(gateway, count // 5, concurrency, stream)
            d50, g50 = statistics.median(direct) * 1000, statistics.median(through) * 1000
            d99, g99 = p99(direct) * 1000, p99(through) * 1000
            mode = "streamed, first byte" if stream else "non-streamed"
            print(
                f"{mode:<22}{concurrency:>5}{d50:>12.2f}{g50:>9.2f}{g50 - d50:>8.2f}"
                f"{d99:>12.2f}{g99:>9.2f}{g99 - d99:>8.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-latency-"))
    with serve_subprocess() as upstream:
        env = {"UPSTREAM_BASE_URL": upstream.base_url, "LOG_LEVEL": "warning"}
        with GatewayProcess(env, workdir) as gateway:
            asyncio.run(run(upstream.base_url, gateway.base_url, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
