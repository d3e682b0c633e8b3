"""Usage statistics: requests, tokens, errors and latency percentiles, grouped by user,
model or day, in a scope and a time range.

Counts and sums are computed by the database. Percentiles are too on PostgreSQL
(``percentile_cont``); SQLite and MySQL have no such aggregate, so there the database ranks
each group's latencies and returns the two values around each percentile, which are then
interpolated linearly: the same definition as PostgreSQL's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.schema import completions
from storage.scope import Scope

GroupBy = Literal["user", "model", "day"]
PERCENTILES = (0.5, 0.95, 0.99)


async def usage_stats(
    connection: AsyncConnection,
    scope: Scope,
    by: GroupBy,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    percentiles: bool = True,
) -> list[dict[str, Any]]:
    """Requests, errors and tokens per group; latency percentiles too unless told not to
    (they cost most of the query: a chart of counts needs none)."""
    c = completions.c
    key = _group_key(by)
    conditions: list[ColumnElement[bool]] = [scope.where(completions)]
    if since is not None:
        conditions.append(c.started_at >= since)
    if until is not None:
        conditions.append(c.started_at < until)
    columns: list[Any] = [
        key.label("key"),
        func.count().label("requests"),
        func.sum(case((c.status_code >= 400, 1), else_=0)).label("errors"),
        func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(c.total_tokens), 0).label("total_tokens"),
        func.count(c.latency_ms).label("timed"),
    ]
    postgres = connection.dialect.name == "postgresql"
    if postgres and percentiles:
        for p in PERCENTILES:
            columns.append(func.percentile_cont(p).within_group(c.latency_ms).label(_name(p)))
    query = select(*columns).where(*conditions).group_by(key).order_by(key)
    groups = [dict(row) for row in (await connection.execute(query)).mappings()]
    if not percentiles:
        for group in groups:
            group.update(dict.fromkeys(map(_name, PERCENTILES)))
    elif not postgres:
        await _percentiles_by_rank(connection, key, conditions, groups)
    for group in groups:
        del group["timed"]
        group["key"] = None if group["key"] is None else str(group["key"])
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"):
            group[name] = int(group[name] or 0)
        for p in PERCENTILES:
            value = group[_name(p)]
            group[_name(p)] = None if value is None else round(float(value), 3)
    return groups


async def _percentiles_by_rank(
    connection: AsyncConnection,
    key: ColumnElement[Any],
    conditions: list[ColumnElement[bool]],
    groups: list[dict[str, Any]],
) -> None:
    """Percentiles without a percentile aggregate: the database ranks each group's latencies
    (a window function) and returns only the rows at the ranks the interpolation needs."""
    c = completions.c
    wanted: set[int] = set()
    for group in groups:
        for p in PERCENTILES:
            wanted |= set(_ranks(group["timed"], p))
    found: dict[tuple[Any, int], float] = {}
    if wanted:
        ranked = (
            select(
                key.label("key"),
                c.latency_ms.label("value"),
                func.row_number().over(partition_by=key, order_by=c.latency_ms).label("rank"),
            )
            .where(*conditions, c.latency_ms.isnot(None))
            .subquery()
        )
        query = select(ranked.c.key, ranked.c.rank, ranked.c.value).where(
            ranked.c.rank.in_(sorted(wanted))
        )
        for row in (await connection.execute(query)).all():
            found[(row.key, row.rank)] = row.value
    for group in groups:
        for p in PERCENTILES:
            ranks = _ranks(group["timed"], p)
            values = [found.get((group["key"], rank)) for rank in ranks]
            if not ranks or any(v is None for v in values):
                group[_name(p)] = None
                continue
            low, high = values
            position = p * (group["timed"] - 1)
            group[_name(p)] = low + (high - low) * (position - int(position))  # type: ignore[operator]


def _ranks(count: int, p: float) -> list[int]:
    """The 1-based ranks whose values ``percentile`` interpolates between."""
    if count <= 0:
        return []
    low = int(p * (count - 1))
    return [low + 1, min(low + 1, count - 1) + 1]


def percentile(ordered: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (PostgreSQL's ``percentile_cont``)."""
    if not ordered:
        return None
    position = p * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _name(p: float) -> str:
    return f"latency_p{round(p * 100)}_ms"


def _group_key(by: GroupBy) -> ColumnElement[Any]:
    c = completions.c
    if by == "user":
        return c.owner
    if by == "model":
        return func.coalesce(c.response_model, c.requested_model)
    return func.date(c.started_at)
