"""Usage statistics: requests, tokens, errors and latency percentiles, grouped by user,
model or day, in a scope and a time range.

Counts and sums are computed by the database. Percentiles are too on PostgreSQL
(``percentile_cont``); SQLite and MySQL have no such aggregate, so there the latencies of
each group are read in order and the percentile is taken by linear interpolation, the same
definition as PostgreSQL's.
"""

from __future__ import annotations

from collections import defaultdict
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
) -> list[dict[str, Any]]:
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
    ]
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        for p in PERCENTILES:
            columns.append(func.percentile_cont(p).within_group(c.latency_ms).label(_name(p)))
    query = select(*columns).where(*conditions).group_by(key).order_by(key)
    groups = [dict(row) for row in (await connection.execute(query)).mappings()]
    if not postgres:
        latencies: dict[Any, list[float]] = defaultdict(list)
        ordered = (
            select(key.label("key"), c.latency_ms)
            .where(*conditions, c.latency_ms.isnot(None))
            .order_by(key, c.latency_ms)
        )
        async for row in await connection.stream(ordered):
            latencies[row.key].append(row.latency_ms)
        for group in groups:
            values = latencies.get(group["key"], [])
            for p in PERCENTILES:
                group[_name(p)] = percentile(values, p)
    for group in groups:
        group["key"] = None if group["key"] is None else str(group["key"])
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"):
            group[name] = int(group[name] or 0)
        for p in PERCENTILES:
            value = group[_name(p)]
            group[_name(p)] = None if value is None else round(float(value), 3)
    return groups


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
