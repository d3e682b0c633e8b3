"""Usage statistics against the same figures computed here from the rows, on every backend:
each backend finds latency percentiles its own way (PostgreSQL's aggregate, SQLite's
ranking, MySQL's buckets), and all must give PostgreSQL's exact answer."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from storage import database
from storage.schema import completions
from storage.scope import Scope
from storage.stats import PERCENTILES, percentile, usage_stats
from tests.history_db import migrated

START = datetime(2026, 3, 1, 8, 0, 0)


def latency(rng: random.Random, n: int) -> float | None:
    """Spread over four decades, with ties, near-ties (the same 0.1 % bucket), zeros and
    rows without a latency."""
    if n % 23 == 0:
        return None
    if n % 17 == 0:
        return 250.0  # a tie
    if n % 19 == 0:
        return 1000.0 + (n % 5) * 0.01  # near-ties
    if n % 29 == 0:
        return 0.0
    return round(rng.lognormvariate(6, 1.5), 3)


def rows(count: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    made = []
    for n in range(count):
        made.append(
            {
                "id": f"cmpl-{n:06d}",
                "conversation_id": f"conv-{n % 40:03d}",
                "owner": ("ann", "bob", "cai")[n % 3],
                "requested_model": ("gpt-4o-mini", "gpt-4o", None)[n % 7 % 3],
                "response_model": None,
                "request_message_count": 1,
                "prompt_tokens": n % 50,
                "completion_tokens": n % 13,
                "total_tokens": n % 50 + n % 13,
                # A model with no known price (here: none named) has no cost.
                "cost_usd": None if n % 7 % 3 == 2 else (n % 50) * 1e-6 + (n % 13) * 4e-6,
                "status_code": 429 if n % 31 == 0 else 200,
                "stream": False,
                "started_at": START + timedelta(minutes=7 * n),
                "latency_ms": latency(rng, n),
            }
        )
    return made


def expected(made: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in made:
        key = {
            "user": row["owner"],
            "model": row["requested_model"],
            "day": row["started_at"].date().isoformat(),
        }[by]
        groups[key].append(row)
    result = []
    for key in sorted(groups, key=lambda k: (k is not None, k)):
        members = groups[key]
        timed = sorted(r["latency_ms"] for r in members if r["latency_ms"] is not None)
        group = {
            "key": key,
            "requests": len(members),
            "errors": sum(r["status_code"] >= 400 for r in members),
            "prompt_tokens": sum(r["prompt_tokens"] for r in members),
            "completion_tokens": sum(r["completion_tokens"] for r in members),
            "total_tokens": sum(r["total_tokens"] for r in members),
            "cost_usd": sum(costs)
            if (costs := [r["cost_usd"] for r in members if r["cost_usd"] is not None])
            else None,
        }
        for p in PERCENTILES:
            value = percentile(timed, p)
            group[f"latency_p{round(p * 100)}_ms"] = None if value is None else round(value, 3)
        result.append(group)
    return result


def assert_same(got: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> None:
    """Equal, group by group; latencies to 1e-5 of their value: MySQL keeps them in a FLOAT
    and sends six digits of each (two neighbours in a sorted group differ by far more)."""
    got = sorted(got, key=lambda g: (g["key"] is not None, g["key"]))  # NULL: first or last
    assert [g["key"] for g in got] == [w["key"] for w in wanted]
    for group, want in zip(got, wanted, strict=True):
        assert group.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, float):
                assert group[name] == pytest.approx(value, rel=1e-5), (group["key"], name)
            else:
                assert group[name] == value, (group["key"], name)


@pytest.mark.parametrize("by", ["user", "model", "day"])
def test_stats_and_exact_percentiles(history_dsn: str, by: str) -> None:
    made = rows(3000)

    async def check() -> None:
        async with migrated(history_dsn) as engine:
            async with engine.begin() as connection:
                await connection.execute(completions.insert(), made)
            async with engine.connect() as connection:
                got = await usage_stats(connection, Scope.everyone(), by)
                since = START + timedelta(days=3)
                ranged = await usage_stats(connection, Scope.of("bob"), by, since)
                counts = await usage_stats(connection, Scope.everyone(), by, percentiles=False)
        assert_same(got, expected(made, by))
        bobs = [r for r in made if r["owner"] == "bob" and r["started_at"] >= since]
        assert_same(ranged, expected(bobs, by))
        assert [g["requests"] for g in counts] == [g["requests"] for g in got]
        assert all(g["latency_p50_ms"] is None for g in counts)

    asyncio.run(check())


def test_sqlite_without_its_math_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An SQLite built without ``ln()`` gets Python's, and the same answers."""
    monkeypatch.setattr(database, "SQLITE_HAS_LN", False)
    made = rows(500)

    async def check() -> list[dict[str, Any]]:
        async with migrated(str(tmp_path / "history.db")) as engine:
            async with engine.begin() as connection:
                await connection.execute(completions.insert(), made)
                assert await connection.scalar(text("SELECT ln(0)")) is None
            async with engine.connect() as connection:
                return await usage_stats(connection, Scope.everyone(), "model")

    assert_same(asyncio.run(check()), expected(made, "model"))
    assert database.natural_log(1.0) == 0.0 and database.natural_log(-1) is None
