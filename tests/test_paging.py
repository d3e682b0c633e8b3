"""Newest-first pages read the last day first, oldest-first pages the oldest day (cheap on
a table split by day: the query plans a partition or two), and both fall back to all of
history when that is short: either way every completion comes once, in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from storage.browse import CompletionFilter, list_completions
from storage.partitions import Partitions, first_part_end
from storage.scope import Scope
from tests.history_db import migrated, write_records
from tests.test_partitions import write_through_the_writer
from tests.test_retention import PARIS, turn


@pytest.fixture
async def engine(history_dsn: str) -> AsyncIterator[Any]:
    async with migrated(history_dsn) as engine:
        yield engine


@pytest.mark.parametrize("split", [False, True], ids=["one table", "split by day"])
@pytest.mark.parametrize("descending", [True, False], ids=["newest first", "oldest first"])
async def test_pages_across_day_boundaries_list_everything_once(
    engine: Any, split: bool, descending: bool, tmp_path: Path
) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    hours_ago = [1, 2, 3, 20, 23, 25, 30, 72, 200, 201, 202]  # the last day, and before
    records = [
        turn([{"role": "user", "content": f"asked {h} hours ago"}], PARIS, h / 24, now=now)
        for h in hours_ago
    ]
    if split:
        partitions = Partitions(engine)
        await partitions.setup(now.date())
        await write_through_the_writer(engine, partitions, records, tmp_path)
    else:
        await write_records(engine, *records)
    async with engine.connect() as connection:
        oldest_end = await first_part_end(connection, "completions")
    oldest_day = (now - timedelta(hours=hours_ago[-1])).date()
    assert oldest_end == (
        datetime.combine(oldest_day + timedelta(days=1), time()) if split else None
    )
    expected = [now - timedelta(hours=h) for h in hours_ago]
    if not descending:
        expected.reverse()
    for limit in (1, 2, 4, 5, 9, 20):
        seen: list[datetime] = []
        after = None
        async with engine.connect() as connection:
            while True:
                page = await list_completions(
                    connection,
                    Scope.of("alice"),
                    CompletionFilter(),
                    limit=limit,
                    after=after,
                    descending=descending,
                )
                seen += [row["started_at"] for row in page.rows]
                if not page.has_more:
                    break
                after = page.rows[-1]
        assert seen == expected, f"limit {limit}"
