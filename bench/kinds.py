"""The Responses API against chat, in one run: a stream's added time to first byte through
the gateway, and the writer's cost per record.

    python bench/kinds.py [--requests 400] [--records 4000] [--rounds 3]

Time to first byte: a fake upstream and a gateway (capture into the default SQLite) in
processes of their own; for each kind a streamed request (the same ~1 KB question, 8 text
deltas) is sent ``--requests`` times to the upstream directly and through the gateway, the
two alternating, one at a time, on kept-alive connections. The added time is the median
through the gateway less the median direct, taken in the same round.

The writer: ``--records`` records of each kind, made from the fake upstream's own answers
(each a new conversation, half streamed), are shaped (``rows()``) and written in batches of
200 into a fresh SQLite history file, as the writer process does; the CPU time of this
process (``time.process_time``: shaping, SQLAlchemy, and SQLite, which runs in it) per
record. The kinds alternate by round. Medians over the rounds, and the ratio to chat.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.speed import FILLER  # noqa: E402
from capture.chat import ChatExchange  # noqa: E402
from capture.exchange import Exchange  # noqa: E402
from capture.responses import ResponsesExchange  # noqa: E402
from capture.sse import EventSplitter  # noqa: E402
from fake_upstream.app import create_app  # noqa: E402
from fake_upstream.testing import serve_subprocess  # noqa: E402
from storage.batch import write_batch  # noqa: E402
from storage.database import create_engine, migrate  # noqa: E402
from storage.dsn import parse_dsn  # noqa: E402
from tests.gateway_process import GatewayProcess  # noqa: E402

QUESTION = "Summarise this. " + FILLER * 6  # ~1 KB
KINDS = ("chat", "responses")
BATCH = 200


def request(kind: str, n: int, stream: bool) -> dict[str, Any]:
    text = f"{n}: {QUESTION}"
    if kind == "chat":
        return {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": text}],
            "stream": stream,
        }
    return {"model": "gpt-4o-mini", "input": text, "stream": stream}


PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


# -- time to first byte ---------------------------------------------------------------------


def first_byte_ms(client: httpx.Client, url: str, body: bytes) -> float:
    started = time.perf_counter()
    elapsed = None
    with client.stream(
        "POST", url, content=body, headers={"content-type": "application/json"}
    ) as r:
        for _ in r.iter_raw():  # read it all: the connection goes back to the pool
            if elapsed is None:
                elapsed = (time.perf_counter() - started) * 1000
    if elapsed is None or r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code}, no body")
    return elapsed


def ttfb_round(upstream: str, gateway: str, count: int) -> dict[str, float]:
    """Each kind's added median time to first byte (ms), this round."""
    added = {}
    with httpx.Client(timeout=30) as direct, httpx.Client(timeout=30) as through:
        for kind in KINDS:
            body = orjson.dumps(request(kind, 0, True))
            for client, base in ((direct, upstream), (through, gateway)):
                first_byte_ms(client, base + PATHS[kind], body)  # connect, warm up
            times: dict[str, list[float]] = {"direct": [], "gateway": []}
            for _ in range(count):
                times["direct"].append(first_byte_ms(direct, upstream + PATHS[kind], body))
                times["gateway"].append(first_byte_ms(through, gateway + PATHS[kind], body))
            added[kind] = statistics.median(times["gateway"]) - statistics.median(times["direct"])
    return added


# -- the writer's cost per record -----------------------------------------------------------


async def answers(kind: str, stream: bool) -> tuple[bytes, list[tuple[float, bytes]]]:
    """The fake upstream's answer to one request of ``kind``: its body, or its SSE events
    as the proxy spools them (whole events, each with its arrival time)."""
    app = create_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://u") as c:
        answer = await c.post(PATHS[kind], json=request(kind, 0, stream))
    if not stream:
        return answer.content, []
    events = EventSplitter().feed(answer.content)
    return b"", [(float(at), event) for at, event in enumerate(events, start=1)]


def records(
    kind: str, count: int, made: dict[bool, tuple[bytes, list[tuple[float, bytes]]]]
) -> list[Exchange]:
    record = ChatExchange if kind == "chat" else ResponsesExchange
    out: list[Exchange] = []
    for n in range(count):
        stream = n % 2 == 1
        body, chunks = made[stream]
        out.append(
            record(
                owner="bench",
                key_fingerprint=None,
                client_ip="127.0.0.1",
                user_agent="bench/1",
                conversation_header=None,
                request=request(kind, n, stream),
                stream=stream,
                started_at=datetime.now(UTC).replace(tzinfo=None),
                status=200,
                response_body=body,
                chunks=chunks,
                first_byte_ms=1.0,
                latency_ms=2.0,
            )
        )
    return out


async def writer_round(kind: str, count: int, folder: Path) -> float:
    """CPU microseconds per record to shape and write ``count`` records of ``kind``."""
    made = {stream: await answers(kind, stream) for stream in (False, True)}
    batch = records(kind, count, made)
    database = parse_dsn(str(folder / f"{kind}-{time.monotonic_ns()}.db"))
    engine = create_engine(database)
    await migrate(engine, "history")
    try:
        started = time.process_time()
        for start in range(0, count, BATCH):
            rowsets = [record.rows() for record in batch[start : start + BATCH]]
            async with engine.begin() as connection:
                await write_batch(connection, rowsets)
        return (time.process_time() - started) / count * 1e6
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="streams a kind a round")
    parser.add_argument("--records", type=int, default=4000, help="records a kind a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    added: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cost: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as temp, serve_subprocess() as upstream:
        folder = Path(temp)
        env = {
            "UPSTREAM_BASE_URL": upstream.base_url,
            "LOG_LEVEL": "warning",
            "MES_SQLITE_PATH": str(folder / "history.db"),
            "MES_SPOOL_DIR": str(folder / "spool"),
        }
        with GatewayProcess(env, folder / "gateway") as gateway:
            for round_ in range(args.rounds):
                for kind, ms in ttfb_round(upstream.root, gateway.url, args.requests).items():
                    added[kind].append(ms)
                order = KINDS if round_ % 2 == 0 else KINDS[::-1]
                for kind in order:
                    cost[kind].append(asyncio.run(writer_round(kind, args.records, folder)))
                print(
                    f"round {round_ + 1}: added TTFB "
                    + ", ".join(f"{k} {added[k][-1]:.3f} ms" for k in KINDS)
                    + "; writer CPU "
                    + ", ".join(f"{k} {cost[k][-1]:.0f} us" for k in KINDS),
                    flush=True,
                )
    print()
    print(f"{'':<32}{'chat':>10}{'responses':>11}{'ratio':>8}")
    for name, values, unit in (
        ("added time to first byte", added, "ms"),
        ("writer CPU per record", cost, "us"),
    ):
        chat, responses = (statistics.median(values[k]) for k in KINDS)
        print(
            f"{name + ' (' + unit + ')':<32}{chat:>10.3f}{responses:>11.3f}"
            f"{responses / chat if chat else float('nan'):>8.2f}"
        )


if __name__ == "__main__":
    main()
