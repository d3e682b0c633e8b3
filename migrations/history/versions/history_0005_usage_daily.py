"""Usage by day: per day, owner and model the requests, errors and tokens of the stored
completions, and a histogram of their latencies, which the writer keeps from now on so
that the viewer's pages read a few rows per day and model instead of every completion
(see ``storage/usage.py``). Filled here from the completions already stored, by the rules
of that day, frozen below: what this migration does never changes with today's code.

Revision ID: history_0005
Revises: history_0004
Create Date: 2026-11-26
"""

import math
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "history_0005"
down_revision = "history_0004"
branch_labels = None
depends_on = None

ID = 64
STEP = 10_000
COUNTED = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
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
)
BUCKETS_PER_E = 100  # a latency bucket spans a factor of e^(1/100): 1 % wide
completions = sa.table(
    "completions",
    sa.column("id"),
    *(sa.column(name, sa.DateTime() if name == "started_at" else None) for name in COLUMNS),
)


class Tally:
    """The completions summed per day, owner and model, and their latencies per bucket."""

    def __init__(self) -> None:
        self.usage: dict[tuple[Any, ...], list[int]] = {}
        self.latency: dict[tuple[Any, ...], int] = defaultdict(int)

    def add(self, completion: Any) -> None:
        model = completion["response_model"] or completion["requested_model"] or ""
        key = (completion["started_at"].date(), completion["owner"], model)
        sums = self.usage.setdefault(key, [0] * len(COUNTED))
        sums[0] += 1
        sums[1] += 1 if completion["status_code"] >= 400 else 0
        sums[2] += completion["prompt_tokens"] or 0
        sums[3] += completion["completion_tokens"] or 0
        sums[4] += completion["total_tokens"] or 0
        if completion["latency_ms"] is not None:
            ms = max(completion["latency_ms"], 0.001)
            self.latency[(*key, math.floor(math.log(ms) * BUCKETS_PER_E))] += 1

    def usage_rows(self) -> list[dict[str, Any]]:
        names = ("day", "owner", "model", *COUNTED)
        return [
            dict(zip(names, (*key, *sums), strict=True)) for key, sums in sorted(self.usage.items())
        ]

    def latency_rows(self) -> list[dict[str, Any]]:
        names = ("day", "owner", "model", "bucket", "count")
        return [dict(zip(names, (*key, n), strict=True)) for key, n in sorted(self.latency.items())]


def upgrade() -> None:
    usage = op.create_table(
        "usage_daily",
        *_key(),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in COUNTED),
    )
    latency = op.create_table(
        "latency_daily",
        *_key(),
        sa.Column("bucket", sa.Integer(), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
    )
    bind = op.get_bind()
    counted = Tally()
    read = sa.select(completions.c.id, *(completions.c[name] for name in COLUMNS))
    last = None
    while True:  # in steps by id: the whole table never sits in memory
        query = read.order_by(completions.c.id).limit(STEP)
        if last is not None:
            query = query.where(completions.c.id > last)
        found = bind.execute(query).mappings().all()
        for row in found:
            counted.add(row)
        if len(found) < STEP:
            break
        last = found[-1]["id"]
    for table, rows, columns in (
        (usage, counted.usage_rows(), COUNTED),
        (latency, counted.latency_rows(), ("count",)),
    ):
        for start in range(0, len(rows), STEP):
            bind.execute(_adding(bind, table, columns), rows[start : start + STEP])


def _adding(bind: sa.Connection, table: sa.Table, columns: tuple[str, ...]) -> sa.Insert:
    """INSERT; on MySQL, where a key is there already, add to it: its collation may find
    two keys equal that Python told apart ("GPT-4o" and "gpt-4o")."""
    if bind.dialect.name != "mysql":
        return sa.insert(table)
    statement = mysql.insert(table)
    return statement.on_duplicate_key_update(
        {name: table.c[name] + statement.inserted[name] for name in columns}
    )


def _key() -> list[sa.Column[object]]:
    return [
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("owner", sa.String(ID), primary_key=True),
        sa.Column("model", sa.String(255), primary_key=True),
    ]


def downgrade() -> None:
    op.drop_table("latency_daily")
    op.drop_table("usage_daily")
