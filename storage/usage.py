"""Usage by day: what the viewer's users and statistics pages read instead of every
completion.

For each day (UTC), owner and model, ``usage_daily`` holds the requests, errors and
tokens of the completions stored, and ``latency_daily`` how many of their latencies fell in
each bucket of a logarithmic histogram (buckets 1 % wide). The writer adds a batch's new
completions to them in the transaction that stores the batch (``storage/batch.py``);
deleting completions subtracts them in the transaction that deletes them
(``storage/deletion.py``); dropping a day's partitions drops that day's rows. So a page
reads a few rows per day and model, however many completions there are, on every backend.

Counts and tokens are exact. A percentile taken from the histogram is its bucket's middle,
within 0.501 % of the exact value (the admin API's ``/admin/stats`` computes exact ones
from the completions themselves).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import date
from typing import Any, Literal

from sqlalchemy import ColumnElement, Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from capture.rows import Row
from storage.schema import latency_daily, usage_daily
from storage.scope import Scope
from storage.stats import PERCENTILES, percentile_name

GroupBy = Literal["user", "model", "day"]
BUCKETS_PER_E = 100  # a bucket spans a factor of e^(1/100): 1 % wide
# How far a bucket's middle may be from a latency in it, relative: e^(1/200) - 1, 0.501 %.
HALF_BUCKET = math.exp(0.5 / BUCKETS_PER_E) - 1
# ``priced`` counts the completions with a cost, ``cost_usd`` sums their costs: a day whose
# completions all went unpriced has no cost, not a cost of 0.
COUNTED = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "priced",
    "cost_usd",
)
USAGE_KEY = ("day", "owner", "model")
LATENCY_KEY = (*USAGE_KEY, "bucket")
# What a completion contributes: the columns read to take it away again.
COLUMNS = (
    "started_at",
    "owner",
    "requested_model",
    "response_model",
    "status_code",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "latency_ms",
    "cost_usd",
)


def bucket_of(latency_ms: float) -> int:
    """The histogram bucket of a latency: ``floor(ln(ms) * BUCKETS_PER_E)``."""
    return math.floor(math.log(max(latency_ms, 0.001)) * BUCKETS_PER_E)


def middle_of(bucket: int) -> float:
    """The latency a bucket stands for: its middle on the log scale."""
    return math.exp((bucket + 0.5) / BUCKETS_PER_E)


class Tally:
    """Completions summed per day, owner and model (and latency bucket), each with a sign:
    +1 as they are stored, -1 as they are deleted."""

    def __init__(self) -> None:
        self.usage: dict[tuple[Any, ...], list[float]] = {}
        self.latency: dict[tuple[Any, ...], int] = defaultdict(int)

    def add(self, completion: Mapping[Any, Any], sign: int = 1) -> None:
        model = completion["response_model"] or completion["requested_model"] or ""
        key = (completion["started_at"].date(), completion["owner"], model)
        sums = self.usage.get(key)
        if sums is None:
            sums = self.usage[key] = [0] * (len(COUNTED) - 1) + [0.0]
        sums[0] += sign
        sums[1] += sign if completion["status_code"] >= 400 else 0
        sums[2] += sign * (completion["prompt_tokens"] or 0)
        sums[3] += sign * (completion["completion_tokens"] or 0)
        sums[4] += sign * (completion["total_tokens"] or 0)
        cost = completion["cost_usd"]
        if cost is not None:
            sums[5] += sign
            sums[6] += sign * cost
        if completion["latency_ms"] is not None:
            self.latency[(*key, bucket_of(completion["latency_ms"]))] += sign

    def usage_rows(self) -> list[Row]:
        """One row per key, in key order (writers lock rows in the same order)."""
        return [
            {**dict(zip(USAGE_KEY, key, strict=True)), **dict(zip(COUNTED, sums, strict=True))}
            for key, sums in sorted(self.usage.items())
        ]

    def latency_rows(self) -> list[Row]:
        return [
            {**dict(zip(LATENCY_KEY, key, strict=True)), "count": count}
            for key, count in sorted(self.latency.items())
            if count
        ]


def tally(completions: Iterable[Mapping[Any, Any]], sign: int = 1) -> Tally:
    counted = Tally()
    for completion in completions:
        counted.add(completion, sign)
    return counted


async def daily_usage(
    connection: AsyncConnection,
    scope: Scope,
    by: GroupBy,
    since: date | None = None,
    *,
    percentiles: bool = True,
) -> list[dict[str, Any]]:
    """Requests, errors and tokens per user, model or day, from day ``since`` on, in the
    shape ``storage.stats.usage_stats`` gives; latency percentiles (from the histogram) when
    asked."""
    u = usage_daily.c
    key, conditions = _grouped(usage_daily, scope, by, since)
    query = (
        select(key.label("key"), *(func.sum(u[name]).label(name) for name in COUNTED))
        .where(*conditions)
        .group_by(key)
        .order_by(key)
    )
    groups = []
    for row in (await connection.execute(query)).mappings():
        group: dict[str, Any] = {"key": _key(by, row["key"])}
        group.update((name, int(row[name] or 0)) for name in COUNTED[:-2])
        group["cost_usd"] = round(float(row["cost_usd"]), 12) if row["priced"] else None
        group.update(dict.fromkeys(map(percentile_name, PERCENTILES)))
        groups.append(group)
    if percentiles and groups:
        await _add_percentiles(connection, scope, by, since, groups)
    return groups


async def _add_percentiles(
    connection: AsyncConnection,
    scope: Scope,
    by: GroupBy,
    since: date | None,
    groups: list[dict[str, Any]],
) -> None:
    """Each group's percentiles, read off its histogram (summed over its days and owners)."""
    h = latency_daily.c
    key, conditions = _grouped(latency_daily, scope, by, since)
    query = (
        select(key.label("key"), h.bucket, func.sum(h.count).label("n"))
        .where(*conditions)
        .group_by(key, h.bucket)
        .order_by(key, h.bucket)
    )
    histograms: dict[Any, list[tuple[int, int]]] = defaultdict(list)
    for row in (await connection.execute(query)).all():
        histograms[_key(by, row.key)].append((row.bucket, int(row.n)))
    for group in groups:
        histogram = histograms.get(group["key"], [])
        for p in PERCENTILES:
            group[percentile_name(p)] = histogram_percentile(histogram, p)


def _grouped(
    table: Table, scope: Scope, by: GroupBy, since: date | None
) -> tuple[ColumnElement[Any], list[ColumnElement[bool]]]:
    """The column ``table``'s rows are grouped by, and the conditions that keep the rows
    of the scope from day ``since`` on."""
    key = {"user": table.c.owner, "model": table.c.model, "day": table.c.day}[by]
    conditions: list[ColumnElement[bool]] = [scope.where(table)]
    if since is not None:
        conditions.append(table.c.day >= since)
    return key, conditions


def histogram_percentile(histogram: list[tuple[int, int]], p: float) -> float | None:
    """The ``p`` percentile of latencies counted as (bucket, how many), in bucket order:
    the two ranks PostgreSQL's ``percentile_cont`` interpolates between, each read as its
    bucket's middle."""
    count = sum(n for _, n in histogram)
    if count <= 0:
        return None
    position = p * (count - 1)
    low_rank = int(position)
    values = []
    for rank in (low_rank, min(low_rank + 1, count - 1)):  # 0-based
        below = 0
        for bucket, n in histogram:
            if rank < below + n:
                values.append(middle_of(bucket))
                break
            below += n
    low, high = values
    return round(low + (high - low) * (position - low_rank), 3)


def _key(by: GroupBy, value: Any) -> str | None:
    if by == "model":
        return value or None  # "" stands for no model (a key column cannot be NULL)
    return None if value is None else str(value)
