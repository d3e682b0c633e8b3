"""Two gateway processes (two replicas behind a load balancer) share one history database:
under load, with both writing into the same conversations at once, every record is
stored exactly once, every conversation's totals and the usage by day add up, and no
write deadlocks."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from storage.schema import completions, conversations, messages, usage_daily
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

SHARED = 8  # conversations named by X-Conversation-Id, written by both replicas at once
SHARED_REQUESTS = 400
THREADS = 40  # conversations continued turn by turn, each turn through the other replica
TURNS = 3
CONCURRENCY = 32


async def test_two_replicas_store_every_record_once_without_deadlocks(
    upstream: Any, history_dsn: str, history: HistoryDB, tmp_path: Path
) -> None:
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": history_dsn,
        "MES_BATCH_SIZE": "20",  # many small transactions: more chances to collide
    }
    with (
        GatewayProcess(env, tmp_path / "a") as first,
        GatewayProcess(env, tmp_path / "b") as second,
    ):
        replicas = [first.base_url, second.base_url]
        semaphore = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(timeout=60) as client:

            async def shared(index: int) -> None:
                body = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"shared turn {index}"}],
                }
                headers = {"X-Conversation-Id": f"shared-{index % SHARED}"}
                async with semaphore:
                    response = await client.post(
                        replicas[index % 2] + "/chat/completions", json=body, headers=headers
                    )
                assert response.status_code == 200

            async def thread(index: int) -> None:
                sent: list[dict[str, Any]] = []
                for turn in range(TURNS):
                    sent.append({"role": "user", "content": f"thread {index} turn {turn}"})
                    async with semaphore:
                        response = await client.post(
                            replicas[(index + turn) % 2] + "/chat/completions",
                            json={"model": "gpt-4o-mini", "messages": sent},
                        )
                    assert response.status_code == 200
                    sent.append(response.json()["choices"][0]["message"])

            await asyncio.wait_for(
                asyncio.gather(
                    *(shared(index) for index in range(SHARED_REQUESTS)),
                    *(thread(index) for index in range(THREADS)),
                ),
                timeout=240,
            )
        expected = SHARED_REQUESTS + THREADS * TURNS
        assert await history.wait_for("completions", expected) == expected
        deadline = time.monotonic() + 10  # a writer counts a batch just after its commit
        while True:
            metrics = [httpx.get(replica.url + "/metrics").text for replica in (first, second)]
            counted = [re.search(r"mes_records_written_total (\d+)", t) for t in metrics]
            if sum(int(m[1]) for m in counted if m) >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)

    for text in metrics:
        assert "mes_records_failed_total 0" in text
        assert "mes_records_dead_lettered_total 0" in text
        # A deadlock or lock timeout would have been retried, and counted here.
        assert "mes_write_retries_total 0" in text
    written = [int(re.search(r"mes_records_written_total (\d+)", t)[1]) for t in metrics]  # type: ignore[index]
    assert all(written) and sum(written) == expected

    rows = await history.rows(select(conversations))
    assert len(rows) == SHARED + THREADS
    counts = dict(
        (row["conversation_id"], (row["n"], row["tokens"]))
        for row in await history.rows(
            select(
                completions.c.conversation_id,
                func.count().label("n"),
                func.sum(completions.c.total_tokens).label("tokens"),
            ).group_by(completions.c.conversation_id)
        )
    )
    stored = dict(
        (row["conversation_id"], row["n"])
        for row in await history.rows(
            select(messages.c.conversation_id, func.count().label("n")).group_by(
                messages.c.conversation_id
            )
        )
    )
    for row in rows:
        assert (row["completion_count"], row["total_tokens"]) == counts[row["id"]]
        assert row["message_count"] == stored[row["id"]]
    # Both replicas added to the same day's usage rows: nothing lost to the race.
    [usage] = await history.rows(
        select(
            func.sum(usage_daily.c.requests).label("requests"),
            func.sum(usage_daily.c.total_tokens).label("tokens"),
        )
    )
    assert (usage["requests"], usage["tokens"]) == (
        expected,
        sum(tokens for _, tokens in counts.values()),
    )
    by_size = sorted(row["completion_count"] for row in rows)
    assert by_size == [TURNS] * THREADS + [SHARED_REQUESTS // SHARED] * SHARED
    for row in rows:
        if row["completion_count"] == TURNS:  # user, answer, user, answer, user, answer
            assert row["message_count"] == 2 * TURNS
