"""One batch of captured records written in one transaction, idempotently.

A record may be written twice (a retry after a lost commit acknowledgement, or two writers
replaying the same record): completions and request logs already present are skipped, and
messages and conversations are inserted only where their key is new, so a replay never
duplicates and concurrent writers storing one conversation neither collide nor lose rows.
Rows are sorted by key before every write, so two writers lock them in the same order.

Writers of one conversation take turns: each locks the conversation's row before it adds
messages, so the message count it then takes includes what the writer before it added.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

from sqlalchemy import Table, bindparam, case, func, insert, select, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from storage.rows import Row, RowSet
from storage.schema import completions, conversations, messages, request_logs

DayTable = Callable[[str, date], Table]


async def write_batch(
    connection: AsyncConnection, rowsets: Sequence[RowSet], day_table: DayTable | None = None
) -> int:
    """Write what is new in ``rowsets``; returns how many records were new. With
    ``day_table`` (SQLite split by day), completions and request logs go straight to the
    table of their day, not through the view over all days."""
    rowsets = [_without_nul(rowset) for rowset in rowsets]
    new_completions = await _new_rows(
        connection, completions, [r.completion for r in rowsets if r.completion], day_table
    )
    new_logs = await _new_rows(
        connection, request_logs, [r.request_log for r in rowsets if r.request_log], day_table
    )
    new_ids = {row["id"] for row in new_completions}
    fresh = [r for r in rowsets if r.completion and r.completion["id"] in new_ids]

    conversation_rows = _unique((r.conversation for r in fresh if r.conversation), ("id",))
    if conversation_rows:
        await connection.execute(insert_ignore(connection, conversations), conversation_rows)
        await _lock_conversations(connection, [row["id"] for row in conversation_rows])
    message_rows = _unique((m for r in fresh for m in r.messages), ("conversation_id", "hash"))
    if message_rows:
        await connection.execute(insert_ignore(connection, messages), message_rows)
    for table, rows in _by_table(completions, new_completions, day_table):
        await connection.execute(insert(table), rows)
    for table, rows in _by_table(request_logs, new_logs, day_table):
        await connection.execute(insert(table), rows)
    await _add_to_totals(connection, new_completions)
    return len(new_completions) + len(new_logs)


def _without_nul(rowset: RowSet) -> RowSet:
    """PostgreSQL's text cannot hold NUL (a client may send one in any field): it is dropped
    from plain text columns on every backend alike. JSON columns hold it escaped."""
    rows = [rowset.completion, rowset.conversation, rowset.request_log, *rowset.messages]
    if not any(isinstance(v, str) and "\x00" in v for row in rows if row for v in row.values()):
        return rowset

    def clean(row: Row | None) -> Row | None:
        if row is None:
            return None
        return {k: v.replace("\x00", "") if isinstance(v, str) else v for k, v in row.items()}

    return RowSet(
        completion=clean(rowset.completion),
        conversation=clean(rowset.conversation),
        messages=[m for m in map(clean, rowset.messages) if m is not None],
        request_log=clean(rowset.request_log),
    )


async def _lock_conversations(connection: AsyncConnection, ids: list[str]) -> None:
    if connection.dialect.name == "sqlite":
        return  # one writer at a time holds the whole database
    await connection.execute(
        select(conversations.c.id)
        .where(conversations.c.id.in_(ids))
        .order_by(conversations.c.id)
        .with_for_update()
    )


async def _new_rows(
    connection: AsyncConnection, table: Table, rows: list[Row], day_table: DayTable | None
) -> list[Row]:
    existing: set[str] = set()
    for source, some in _by_table(table, rows, day_table):
        ids = [row["id"] for row in some]
        found = await connection.execute(select(source.c.id).where(source.c.id.in_(ids)))
        existing.update(found.scalars())
    return _unique((row for row in rows if row["id"] not in existing), ("id",))


def _by_table(
    table: Table, rows: list[Row], day_table: DayTable | None
) -> list[tuple[Table, list[Row]]]:
    """``rows`` with the table each goes to: ``table``, or its day's."""
    if not rows:
        return []
    if day_table is None:
        return [(table, rows)]
    by_day: dict[date, list[Row]] = defaultdict(list)
    for row in rows:
        by_day[row["started_at"].date()].append(row)
    return [(day_table(table.name, day), by_day[day]) for day in sorted(by_day)]


def _unique(rows: Any, key: tuple[str, ...]) -> list[Row]:
    by_key: dict[tuple[Any, ...], Row] = {}
    for row in rows:
        by_key.setdefault(tuple(row[k] for k in key), row)
    return [by_key[k] for k in sorted(by_key)]


def insert_ignore(connection: AsyncConnection, table: Table) -> Insert:
    """INSERT that skips rows whose primary key is already there, in each dialect's words."""
    name = connection.dialect.name
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    statement = mysql.insert(table)
    first_key = table.primary_key.columns.values()[0].name
    return statement.on_duplicate_key_update({first_key: statement.inserted[first_key]})


async def _add_to_totals(connection: AsyncConnection, new_completions: list[Row]) -> None:
    totals: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"count": 0, "prompt": 0, "completion": 0, "total": 0, "last": None}
    )
    for row in new_completions:
        entry = totals[row["conversation_id"]]
        entry["count"] += 1
        entry["prompt"] += row["prompt_tokens"] or 0
        entry["completion"] += row["completion_tokens"] or 0
        entry["total"] += row["total_tokens"] or 0
        if entry["last"] is None or row["started_at"] > entry["last"]:
            entry["last"] = row["started_at"]
    if totals:
        await connection.execute(
            _ADD_TO_TOTALS,
            [
                {
                    "b_id": conversation_id,
                    "b_count": entry["count"],
                    "b_prompt": entry["prompt"],
                    "b_completion": entry["completion"],
                    "b_total": entry["total"],
                    "b_last": entry["last"],
                }
                for conversation_id, entry in sorted(totals.items())
            ],
        )


# One statement for every conversation of a batch, run as an executemany: built and
# compiled once, not once per conversation.
_ADD_TO_TOTALS = (
    update(conversations)
    .where(conversations.c.id == bindparam("b_id"))
    .values(
        completion_count=conversations.c.completion_count
        + bindparam("b_count", type_=conversations.c.completion_count.type),
        prompt_tokens=conversations.c.prompt_tokens
        + bindparam("b_prompt", type_=conversations.c.prompt_tokens.type),
        completion_tokens=conversations.c.completion_tokens
        + bindparam("b_completion", type_=conversations.c.completion_tokens.type),
        total_tokens=conversations.c.total_tokens
        + bindparam("b_total", type_=conversations.c.total_tokens.type),
        message_count=select(func.count())
        .select_from(messages)
        .where(messages.c.conversation_id == conversations.c.id)
        .scalar_subquery(),
        updated_at=case(
            (
                conversations.c.updated_at
                < bindparam("b_last", type_=conversations.c.updated_at.type),
                bindparam("b_last", type_=conversations.c.updated_at.type),
            ),
            else_=conversations.c.updated_at,
        ),
    )
)
