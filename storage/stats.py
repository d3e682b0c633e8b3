"""Usage statistics: requests, tokens, errors and latency percentiles, grouped by user,
model or day, in a scope and a time range.

Counts and sums are computed by the database. Percentiles are too on PostgreSQL
(``percentile_cont``). SQLite and MySQL have no such aggregate; ranking every latency with
a window function costs more than all the rest (~200 ms of 290 for 100,000 rows on SQLite,
~400 ms on MariaDB). So there the counting pass also counts each group's latencies in
narrow buckets (of their logarithm); each rank a percentile needs falls in a bucket, and a
second pass reads only the latencies of those few buckets. The two latencies around each
percentile's rank are interpolated linearly: PostgreSQL's definition, and exact.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Integer, and_, case, cast, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.schema import completions, request_logs
from storage.scope import Scope

GroupBy = Literal["user", "model", "day", "call_type", "upstream"]
PERCENTILES = (0.5, 0.95, 0.99)
# Latency buckets for SQLite's and MySQL's percentiles: 0.1 % wide on a log scale (a few
# thousand per group at most), so the second pass reads ~0.1 % of a group's rows per rank.
BUCKETS_PER_E = 1000
_OWNER_INDEX = "ix_completions_owner_started_id"


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
        func.count(c.cost_usd).label("priced"),
        func.coalesce(func.sum(c.cost_usd), 0).label("cost_usd"),
        func.count(c.latency_ms).label("timed"),
    ]
    dialect = connection.dialect.name
    bucket = _bucket() if percentiles and dialect != "postgresql" else None
    if dialect == "postgresql" and percentiles:
        for p in PERCENTILES:
            columns.append(
                func.percentile_cont(p).within_group(c.latency_ms).label(percentile_name(p))
            )
    grouping = [key] if bucket is None else [key, bucket]
    if bucket is not None:
        columns.append(bucket.label("bucket"))
    query = select(*columns).where(*conditions).group_by(*grouping).order_by(*grouping)
    if by == "user":
        # MySQL/MariaDB would walk the (owner, started_at, id) index to group, fetching every
        # row by its key: 2.5x slower than a scan (300 vs 120 ms at 100,000 rows).
        query = query.with_hint(completions, f"IGNORE INDEX FOR GROUP BY ({_OWNER_INDEX})", "mysql")
    rows = [dict(row) for row in (await connection.execute(query)).mappings()]
    if bucket is None:
        groups = rows
    else:
        groups, histograms = _fold(rows)
        await _percentiles_by_bucket(connection, key, bucket, conditions, groups, histograms)
    if not percentiles:
        for group in groups:
            group.update(dict.fromkeys(map(percentile_name, PERCENTILES)))
    for group in groups:
        del group["timed"]
        group["key"] = None if group["key"] is None else str(group["key"])
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"):
            group[name] = int(group[name] or 0)
        # The cost of the priced ones; none at all where none was priced (never 0).
        group["cost_usd"] = round(float(group["cost_usd"]), 12) if group.pop("priced") else None
        for p in PERCENTILES:
            value = group[percentile_name(p)]
            group[percentile_name(p)] = None if value is None else round(float(value), 3)
    return groups


def _bucket() -> ColumnElement[Any]:
    """A latency's bucket: in the same order as the latencies (a cast to integer rounds on
    MySQL and truncates on SQLite: either keeps the order, which is all that counts)."""
    latency = completions.c.latency_ms
    floored = case((latency < 0.001, 0.001), else_=latency)
    return cast(func.ln(floored) * BUCKETS_PER_E, Integer)


_SUMMED = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "timed")
_ADDED = (*_SUMMED, "priced", "cost_usd")


def _fold(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[tuple[Any, int]]]]:
    """Rows per (group, bucket), in order, as one row per group and each group's histogram
    of latencies: (bucket, how many), in bucket order."""
    groups: list[dict[str, Any]] = []
    histograms: list[list[tuple[Any, int]]] = []
    for row in rows:
        if not groups or groups[-1]["key"] != row["key"]:
            groups.append({"key": row["key"], **dict.fromkeys(_ADDED, 0)})
            histograms.append([])
        group = groups[-1]
        for name in _SUMMED:
            group[name] += int(row[name] or 0)
        group["priced"] += int(row["priced"] or 0)
        group["cost_usd"] += float(row["cost_usd"] or 0)
        if row["bucket"] is not None:
            histograms[-1].append((row["bucket"], int(row["timed"])))
    return groups, histograms


async def _percentiles_by_bucket(
    connection: AsyncConnection,
    key: ColumnElement[Any],
    bucket: ColumnElement[Any],
    conditions: list[ColumnElement[bool]],
    groups: list[dict[str, Any]],
    histograms: list[list[tuple[Any, int]]],
) -> None:
    """Each rank a percentile needs, found in its group's histogram as (bucket, place in
    it); then the latencies of just those buckets, read and sorted, give the values."""
    buckets: dict[int, set[Any]] = defaultdict(set)  # group -> buckets holding a rank
    where: dict[tuple[int, int], tuple[Any, int]] = {}  # (group, rank) -> bucket, offset
    for index, (group, histogram) in enumerate(zip(groups, histograms, strict=True)):
        for p in PERCENTILES:
            for rank in _ranks(group["timed"], p):
                below = 0
                for value, count in histogram:
                    if rank <= below + count:
                        where[(index, rank)] = (value, rank - below - 1)
                        buckets[index].add(value)
                        break
                    below += count
    found: dict[tuple[int, Any], list[float]] = defaultdict(list)
    if buckets:
        latency = completions.c.latency_ms

        def of_group(index: int) -> ColumnElement[bool]:
            value = groups[index]["key"]
            return key.is_(None) if value is None else key == value

        indexes = sorted(buckets)
        query = select(
            case(*((of_group(i), i) for i in indexes)).label("group"),
            bucket.label("bucket"),
            latency,
        ).where(
            *conditions,
            latency.isnot(None),
            bucket.in_(sorted(set().union(*buckets.values()))),  # most rows stop here
            or_(*(and_(of_group(i), bucket.in_(sorted(buckets[i]))) for i in indexes)),
        )
        for row in (await connection.execute(query)).all():
            found[(row.group, row.bucket)].append(row.latency_ms)
        for latencies in found.values():
            latencies.sort()
    for index, group in enumerate(groups):
        for p in PERCENTILES:
            ranks = _ranks(group["timed"], p)
            at_ranks = [_value_at(found, index, where.get((index, rank))) for rank in ranks]
            group[percentile_name(p)] = _interpolate(at_ranks, group["timed"], p)


def _value_at(
    found: dict[tuple[int, Any], list[float]], group: int, place: tuple[Any, int] | None
) -> float | None:
    """The latency at ``place`` (bucket, offset) among ``group``'s, if it was read."""
    if place is None:
        return None
    bucket, offset = place
    values = found.get((group, bucket), [])
    return values[offset] if offset < len(values) else None


def _interpolate(values: list[float | None], count: int, p: float) -> float | None:
    """The percentile from the values at its two ranks (see ``_ranks``)."""
    if not values or any(v is None for v in values):
        return None
    low, high = values
    position = p * (count - 1)
    return low + (high - low) * (position - int(position))  # type: ignore[operator]


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


def percentile_name(p: float) -> str:
    return f"latency_p{round(p * 100)}_ms"


def _group_key(by: GroupBy) -> ColumnElement[Any]:
    c = completions.c
    if by == "user":
        return c.owner
    if by == "model":
        return func.coalesce(c.response_model, c.requested_model)
    if by == "call_type":
        return c.call_type
    if by == "upstream":
        return c.upstream
    return func.date(c.started_at)


async def route_stats(
    connection: AsyncConnection, scope: Scope, since: datetime | None = None
) -> list[dict[str, Any]]:
    """The other proxied routes (request logs): requests, errors and mean latency per
    method and route (ids folded: ``/v1/responses/{id}``), busiest first."""
    c = request_logs.c
    route = func.coalesce(c.route, c.path)  # logged before routes were: by path
    query = (
        select(
            c.method,
            route.label("route"),
            func.count().label("requests"),
            func.sum(case((c.status_code >= 400, 1), else_=0)).label("errors"),
            func.avg(c.latency_ms).label("latency"),
        )
        .where(scope.where(request_logs), *([c.started_at >= since] if since else []))
        .group_by(c.method, route)
        .order_by(func.count().desc(), route, c.method)
        .limit(ROUTES_SHOWN)
    )
    return [
        {
            "method": row["method"],
            "route": row["route"],
            "requests": int(row["requests"]),
            "errors": int(row["errors"] or 0),
            "latency_mean_ms": None if row["latency"] is None else round(float(row["latency"]), 3),
        }
        for row in (await connection.execute(query)).mappings()
    ]


ROUTES_SHOWN = 100
