"""Newest-first pages read the last day first (cheap on a table split by day) and fall
back to all of history when it is short: either way every completion comes once, in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from storage.browse import CompletionFilter, list_completions
from storage.scope import Scope
from tests.history_db import migrated, write_records
from tests.test_retention import PARIS, turn


@pytest.fixture
async def engine(history_dsn: str) -> AsyncIterator[Any]:
    async with migrated(history_dsn) as engine:
        yield engine


async def test_pages_across_the_last_day_boundary_list_everything_once(engine: Any) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    hours_ago = [1, 2, 3, 20, 23, 25, 30, 72, 200]  # the last day, and before
    records = [
        turn([{"role": "user", "content": f"asked {h} hours ago"}], PARIS, h / 24, now=now)
        for h in hours_ago
    ]
    await write_records(engine, *records)
    for limit in (1, 2, 4, 5, 9, 20):
        seen: list[datetime] = []
        after = None
        async with engine.connect() as connection:
            while True:
                page = await list_completions(
                    connection, Scope.of("alice"), CompletionFilter(), limit=limit, after=after
                )
                seen += [row["started_at"] for row in page.rows]
                if not page.has_more:
                    break
                after = page.rows[-1]
        expected = [now - timedelta(hours=h) for h in hours_ago]
        assert seen == expected, f"limit {limit}"
