"""The usage by day the viewer reads (``storage/usage.py``) against the completions
themselves, on every backend: after the writer stores batches (one of them twice), and
after completions are deleted one conversation, one owner and one age at a time."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from capture.rows import COMPLETIONS, CONVERSATIONS, RowSet
from storage import deletion
from storage.batch import write_batch
from storage.schema import completions, latency_daily, usage_daily
from storage.scope import Scope
from storage.usage import HALF_BUCKET, bucket_of, daily_usage, histogram_percentile, middle_of
from tests.history_db import migrated
from tests.test_stats import START, expected, rows


def records(count: int) -> list[dict[str, Any]]:
    made = rows(count)
    for row in made:  # a conversation belongs to one owner
        row["conversation_id"] = f"{row['owner']}-{row['conversation_id']}"
    return made


def rowset(completion: dict[str, Any]) -> RowSet:
    conversation = {
        "id": completion["conversation_id"],
        "owner": completion["owner"],
        "created_at": completion["started_at"],
        "updated_at": completion["started_at"],
    }
    return RowSet({COMPLETIONS: [completion], CONVERSATIONS: [conversation]})


async def assert_matches(engine: AsyncEngine, made: list[dict[str, Any]]) -> None:
    """Each grouping, everyone's and one owner's from a day on, as computed from ``made``:
    counts exactly, percentiles within half a bucket (0.501 %)."""
    since = (START + timedelta(days=3)).date()
    bobs = [r for r in made if r["owner"] == "bob" and r["started_at"].date() >= since]
    async with engine.connect() as connection:
        for by in ("user", "model", "day"):
            everyone = await daily_usage(connection, Scope.everyone(), by)  # type: ignore[arg-type]
            assert_close(everyone, expected(made, by))
            ranged = await daily_usage(connection, Scope.of("bob"), by, since)  # type: ignore[arg-type]
            assert_close(ranged, expected(bobs, by))
        # Nothing is kept at zero: a row goes with the last completion it counted.
        assert all(
            row.requests > 0 for row in (await connection.execute(select(usage_daily))).all()
        )
        assert all(row.count > 0 for row in (await connection.execute(select(latency_daily))).all())


def assert_close(got: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> None:
    got = sorted(got, key=lambda g: (g["key"] is not None, g["key"]))
    assert [g["key"] for g in got] == [w["key"] for w in wanted]
    for group, want in zip(got, wanted, strict=True):
        assert group.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, float):
                assert group[name] == pytest.approx(value, rel=HALF_BUCKET, abs=0.001), (
                    group["key"],
                    name,
                )
            else:
                assert group[name] == value, (group["key"], name)


def test_usage_by_day_follows_writes_and_deletions(history_dsn: str) -> None:
    made = records(3000)
    batches = [[rowset(c) for c in made[start : start + 200]] for start in range(0, 3000, 200)]

    async def check() -> None:
        async with migrated(history_dsn) as engine:
            for batch in [*batches, batches[0]]:  # the first batch again: it adds nothing
                async with engine.begin() as connection:
                    await write_batch(connection, batch)
            await assert_matches(engine, made)

            cutoff = START + timedelta(days=4, hours=5)
            async with engine.begin() as connection:
                await deletion.delete_conversation(connection, Scope.of("bob"), "bob-conv-001")
                await deletion.delete_completion(connection, Scope.of("ann"), made[3]["id"])
                await deletion.delete_owner_history(connection, Scope.of("cai"))
                while await deletion.prune_step(connection, Scope.everyone(), cutoff, 100):
                    pass  # as retention prunes, in steps (here in one transaction)
            remaining = [
                r
                for r in made
                if r["conversation_id"] != "bob-conv-001"
                and r["id"] != made[3]["id"]
                and r["owner"] != "cai"
                and r["started_at"] >= cutoff
            ]
            assert 0 < len(remaining) < len(made)
            await assert_matches(engine, remaining)

    asyncio.run(check())


def test_a_percentile_is_its_buckets_middle_within_half_a_bucket() -> None:
    for latency in (0.0, 0.2, 1.0, 99.99, 250.0, 1234.5, 86_400_000.0):
        middle = middle_of(bucket_of(latency))
        assert middle == pytest.approx(max(latency, 0.001), rel=HALF_BUCKET)
    # Ranks interpolated as PostgreSQL's percentile_cont does: 4 values, p50 between 2 and 3.
    histogram = [(bucket_of(10.0), 2), (bucket_of(20.0), 2)]
    assert histogram_percentile(histogram, 0.5) == pytest.approx(15.0, rel=HALF_BUCKET)
    assert histogram_percentile(histogram, 0.0) == pytest.approx(10.0, rel=HALF_BUCKET)
    assert histogram_percentile([], 0.5) is None


def test_models_that_differ_in_case_are_counted_apart_on_every_backend(history_dsn: str) -> None:
    made = records(2)
    made[0]["requested_model"] = made[0]["response_model"] = "GPT-4o"
    made[1]["requested_model"] = made[1]["response_model"] = "gpt-4o"
    made[1]["started_at"] = made[0]["started_at"]  # the same day, the same owner
    made[1]["owner"], made[1]["conversation_id"] = made[0]["owner"], "case-2"
    made[0]["latency_ms"], made[1]["latency_ms"] = 12_345.678, 0.125

    async def check() -> tuple[list[Any], list[Any]]:
        async with migrated(history_dsn) as engine:
            async with engine.begin() as connection:
                await write_batch(connection, [rowset(c) for c in made])
            async with engine.connect() as connection:
                usage = (await connection.execute(select(usage_daily.c.model))).scalars().all()
                latencies = (
                    (await connection.execute(select(completions.c.latency_ms))).scalars().all()
                )
            return list(usage), list(latencies)

    usage, latencies = asyncio.run(check())
    assert sorted(usage) == ["GPT-4o", "gpt-4o"]
    assert sorted(latencies) == [0.125, 12_345.678]  # a double's digits on MySQL too
