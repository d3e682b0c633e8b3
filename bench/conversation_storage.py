"""What a conversation costs to store: the gateway's message chains against a per-request store.

Starts the fake upstream and the gateway (SQLite unless --dsn names another database), holds
conversations of 10, 25 and 50 turns through the real OpenAI SDK as a chat client does (each
turn resends the whole history: ~1 KB of question, ~1 KB of answer), then reads back what the
history database holds and prints, per conversation: the size of the final request, the bytes
stored for its messages, and what a store that keeps every request whole would need.

    python bench/conversation_storage.py [--backend sqlite|postgresql|mysql] [--turns 10 25 50]

--backend postgresql or mysql starts a throwaway server from Debian's packages, as the tests
do; --dsn uses a database of yours instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from openai import AsyncOpenAI
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_upstream.testing import serve  # noqa: E402
from storage.history import request_messages  # noqa: E402
from storage.schema import messages  # noqa: E402
from tests.dbservers import start_mariadb, start_postgres  # noqa: E402
from tests.gateway_process import GatewayProcess  # noqa: E402
from tests.history_db import HistoryDB  # noqa: E402

ANSWER_WORDS = {"X-Fake-Chunks": "130"}


def question(turn: int, topic: str) -> dict[str, Any]:
    filler = " ".join(f"detail-{turn}-{i} 京都の寺" for i in range(60))
    return {"role": "user", "content": f"Turn {turn} about {topic}: {filler}"}


async def converse(client: AsyncOpenAI, topic: str, turns: int) -> list[list[Any]]:
    history: list[Any] = [{"role": "system", "content": f"You plan trips to {topic}."}]
    sent = []
    for turn in range(1, turns + 1):
        history.append(question(turn, topic))
        sent.append(list(history))
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", messages=history, extra_headers=ANSWER_WORDS
        )
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    return sent


async def measure(dsn: str, upstream_url: str, workdir: Path, turn_counts: list[int]) -> None:
    env = {"UPSTREAM_BASE_URL": upstream_url, "SQL_DSN": dsn}
    conversations: dict[str, list[list[Any]]] = {}
    with GatewayProcess(env, workdir) as gateway:
        async with AsyncOpenAI(base_url=gateway.base_url, api_key="sk-bench") as client:
            started = time.perf_counter()
            for turns in turn_counts:
                topic = f"place-{turns}"
                conversations[topic] = await converse(client, topic, turns)
            elapsed = time.perf_counter() - started
        db = HistoryDB(dsn)
        try:
            total = sum(turn_counts)
            if await db.wait_for("completions", total) != total:
                raise SystemExit("the gateway did not record every request")
            print(f"backend: {db.database.kind}; {total} requests in {elapsed:.1f} s\n")
            header = ("turns", "final request", "stored", "ratio", "per-request store", "ratio")
            print("{:>5}  {:>13}  {:>10}  {:>6}  {:>17}  {:>6}".format(*header))
            rows = await db.completions()
            async with db.engine.connect() as connection:
                rebuilt = [(row, await request_messages(connection, row)) for row in rows]
                for sent in conversations.values():
                    # This conversation's requests: the ones that open with its system prompt.
                    mine = [(r, q) for r, q in rebuilt if q[0] == sent[0][0]]
                    rebuilt_ok = sum(request in sent for _, request in mine) == len(sent)
                    (conversation_id,) = {row["conversation_id"] for row, _ in mine}
                    stored_rows = await connection.execute(
                        select(messages.c.body, messages.c.content_text).where(
                            messages.c.conversation_id == conversation_id
                        )
                    )
                    stored = sum(
                        len(body.encode()) + len((text or "").encode())
                        for body, text in stored_rows
                    )
                    final = len(orjson.dumps(sent[-1]))
                    naive = sum(len(orjson.dumps(request)) for request in sent)
                    print(
                        f"{len(sent):>5}  {final:>11} B  {stored:>8} B  {stored / final:>5.2f}x"
                        f"  {naive:>15} B  {naive / final:>5.1f}x"
                        + ("" if rebuilt_ok else "  REBUILD MISMATCH")
                    )
        finally:
            await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "mysql"), default="sqlite")
    parser.add_argument("--dsn", help="history database of yours (overrides --backend)")
    parser.add_argument("--turns", type=int, nargs="+", default=[10, 25, 50])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-"))
    server = None
    if args.dsn:
        dsn = args.dsn
    elif args.backend == "sqlite":
        dsn = str(workdir / "history.db")
    else:
        starter = start_postgres if args.backend == "postgresql" else start_mariadb
        server = starter(Path(tempfile.mkdtemp(prefix=f"mes-bench-{args.backend}-")))
        dsn = server.url("bench_history")
    try:
        with serve() as upstream:
            asyncio.run(measure(dsn, upstream.base_url, workdir, args.turns))
    finally:
        if server is not None:
            server.shutdown()


if __name__ == "__main__":
    main()
