"""Retention: history older than ``MES_RETENTION_DAYS`` removed, and message content older
than ``MES_CONTENT_RETENTION_DAYS`` dropped, in small steps that each commit on their own.

No step holds its locks for long: a prune step takes the old completions of at most
``step`` conversations (and as many old request logs), a content step at most ``step * 10``
messages, and commits. Writers and readers go on between steps.

What a conversation keeps when its early turns are older than the retention: its old
completions go; the messages that a remaining completion's request or answer reaches stay
(a kept completion can always be rebuilt exactly, however old its first messages are);
the other messages go, and its totals are recounted from what remains. A conversation
whose last completion goes is deleted. Content retention drops what was said and keeps who
said it, when, the tool calls' names, and every metadata row (see ``without_content``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, false, or_, select, tuple_, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from capture.redaction import without_content
from storage import archive as archiving
from storage import deletion
from storage.archive import Archive
from storage.deletion import Deleted, prune_step
from storage.partitions import Partitions
from storage.schema import completions, conversations, messages
from storage.scope import Scope


@dataclass(frozen=True, slots=True)
class Run:
    """What one retention pass did, and the longest any of its transactions took."""

    deleted: Deleted = Deleted()
    contents_dropped: int = 0
    steps: int = 0
    longest_step: float = 0.0
    days_dropped: int = 0


async def prune(
    engine: AsyncEngine,
    cutoff: datetime,
    step: int = 100,
    partitions: Partitions | None = None,
    archive: Archive | None = None,
    reason: str = "retention",
) -> Run:
    """Remove every completion and request log started before ``cutoff``. With daily
    partitions, the days wholly before it are dropped at once, and what they leave unused
    (conversations and messages) is then removed in steps. With an ``archive``, what goes
    is written there first (``storage/archive.py``); a step whose archive cannot be
    written raises ``ArchiveFailed`` and removes nothing."""
    keep = keep_day = None
    if archive is not None:
        keep = functools.partial(archiving.keep, archive=archive, reason=reason)
        if partitions is not None:
            keep_day = functools.partial(
                archiving.keep_day,
                engine=engine,
                partitions=partitions,
                archive=archive,
                reason=reason,
            )

    def step_of(connection: AsyncConnection) -> Awaitable[Deleted]:
        return prune_step(connection, Scope.everyone(), cutoff, step, keep)

    if partitions is None:
        return await _in_steps(engine, step_of)
    days = await partitions.drop_before(cutoff.date(), keep_day)
    dropped = Deleted(
        completions=sum(n for n, _ in days.values()),
        request_logs=sum(n for _, n in days.values()),
    )
    # What is left older than the cutoff: history from before partitioning, or the part of
    # a day before a cutoff that is not midnight. Then that history's table, once empty.
    run = await _in_steps(engine, step_of)
    await partitions.drop_empty_legacy(cutoff.date())
    orphans = await _drop_orphans(engine, cutoff, step)
    straddlers = await _tidy_straddlers(engine, cutoff, step)
    return Run(
        deleted=run.deleted + dropped + orphans.deleted + straddlers.deleted,
        steps=run.steps + len(days) + orphans.steps + straddlers.steps,
        longest_step=max(run.longest_step, orphans.longest_step, straddlers.longest_step),
        days_dropped=len(days),
    )


async def _in_steps(
    engine: AsyncEngine, step: Callable[[AsyncConnection], Awaitable[Deleted]]
) -> Run:
    """Run ``step`` in a transaction of its own until it finds nothing more to do.

    SQLite has one write lock and no queue for it: a writer waiting for it sleeps and
    polls (up to 100 ms apart), and a prune that began its next step at once would find
    the lock free first, step after step. So on SQLite each step is followed by a pause
    as long as it took, a window in which the writer's next poll finds the lock free."""
    deleted, steps, longest = Deleted(), 0, 0.0
    while True:
        async with _transaction(engine) as timed:
            done = await step(timed.connection)
        longest = max(longest, timed.seconds)
        steps += 1
        if not done:
            return Run(deleted=deleted, steps=steps, longest_step=longest)
        deleted += done
        if engine.dialect.name == "sqlite":
            await asyncio.sleep(timed.seconds)


@dataclass(slots=True)
class _Timed:
    """A step's connection; once the step has committed, how long its transaction took."""

    connection: AsyncConnection
    seconds: float = 0.0


@asynccontextmanager
async def _transaction(engine: AsyncEngine) -> AsyncIterator[_Timed]:
    """A step's transaction, and (once it has committed) how long it took: the time it may
    have held its locks. SQLite copies its write-ahead log back into the database file
    (a checkpoint, with an ``fsync``) in the COMMIT that grew the log past its threshold,
    after the write lock is released; a slow disk made a step look long that way (0.25 s
    seen) when its locks were held for ~15 ms. So on SQLite a step's connection leaves the
    checkpoint to the end of the step, outside the time measured."""
    async with engine.connect() as connection:
        driver: Any = None
        if engine.dialect.name == "sqlite":
            driver = (await connection.get_raw_connection()).driver_connection
            await driver.execute("PRAGMA wal_autocheckpoint=0")
        step = _Timed(connection)
        try:
            started = time.perf_counter()
            async with connection.begin():
                yield step
            step.seconds = time.perf_counter() - started
        finally:
            if driver is not None:
                await driver.execute("PRAGMA wal_autocheckpoint=1000")  # SQLite's default
                await driver.execute("PRAGMA wal_checkpoint(PASSIVE)")


async def _drop_orphans(engine: AsyncEngine, cutoff: datetime, limit: int) -> Run:
    """Conversations whose every turn was in the days dropped: gone, with their messages.
    (One that still has a completion, written for an old day meanwhile, is tidied instead
    and passed over: the walk goes on after it.)"""
    c = conversations.c
    return await _walk_conversations(
        engine,
        c.updated_at < cutoff,
        c.updated_at,
        limit,
        lambda connection, rows: deletion.drop_conversations(connection, [r.id for r in rows]),
    )


async def _tidy_straddlers(engine: AsyncEngine, cutoff: datetime, limit: int) -> Run:
    """Conversations begun before ``cutoff`` and continued since: those whose count of
    completions no longer matches (some were in the days dropped) are tidied."""
    c = conversations.c
    return await _walk_conversations(
        engine,
        and_(c.created_at < cutoff, c.updated_at >= cutoff),
        c.created_at,
        limit,
        lambda connection, rows: deletion.tidy_if_changed(
            connection, {r.id: r.completion_count for r in rows}
        ),
    )


async def _walk_conversations(
    engine: AsyncEngine,
    condition: ColumnElement[bool],
    order: Any,
    limit: int,
    handle: Callable[[AsyncConnection, Sequence[Any]], Awaitable[Deleted]],
) -> Run:
    """``handle`` the conversations matching ``condition``, ``limit`` at a time in
    (``order``, id) order, each batch in a transaction of its own. The walk keeps its place,
    so a conversation that stays is never met twice."""
    c = conversations.c
    deleted, steps, longest = Deleted(), 0, 0.0
    after: tuple[Any, str] | None = None
    while True:
        async with _transaction(engine) as timed:
            connection = timed.connection
            query = (
                select(c.id, order.label("position"), c.completion_count)
                .where(condition)
                .order_by(order, c.id)
                .limit(limit)
            )
            if after is not None:
                query = query.where(tuple_(order, c.id) > tuple_(*after))
            rows = (await connection.execute(query)).all()
            if rows:
                after = (rows[-1].position, rows[-1].id)
                deleted += await handle(connection, rows)
        longest = max(longest, timed.seconds)
        steps += 1
        if len(rows) < limit:
            return Run(deleted=deleted, steps=steps, longest_step=longest)


async def drop_content(
    engine: AsyncEngine, cutoff: datetime, step: int = 100, archive: Archive | None = None
) -> Run:
    """Drop the content of messages stored before ``cutoff``; with it, in their
    conversations, the other choices (``n`` > 1) of completions started before it and the
    title of a conversation begun before it (the title is its first user message). With an
    ``archive``, the completions whose content goes are written there whole first."""
    dropped, steps, longest = 0, 0, 0.0
    while True:
        async with _transaction(engine) as timed:
            count = await _drop_content_step(timed.connection, cutoff, step * 10, archive)
        longest = max(longest, timed.seconds)
        steps += 1
        dropped += count
        if not count:
            return Run(contents_dropped=dropped, steps=steps, longest_step=longest)


# What a content step reads of a message: enough to strip it, and when it was stored.
_CONTENT_COLUMNS = (
    messages.c.conversation_id,
    messages.c.hash,
    messages.c.body,
    messages.c.content_text,
    messages.c.content_in_text,
    messages.c.created_at,
)


async def _drop_content_step(
    connection: AsyncConnection, cutoff: datetime, limit: int, archive: Archive | None
) -> int:
    rows = (
        (
            await connection.execute(
                select(*_CONTENT_COLUMNS)
                .where(messages.c.created_at < cutoff, messages.c.content_dropped == false())
                .order_by(messages.c.content_dropped, messages.c.created_at)
                .limit(limit)
            )
        )
        .mappings()
        .all()
    )
    if not rows:
        return 0
    archived: list[str] | None = None
    if archive is not None:
        if len(rows) == limit:  # a record's messages share its time: none left for the next
            rows = [*rows, *await _same_time(connection, rows)]
        archived = await _keep_content(connection, archive, rows)
    stripped = [without_content(dict(row)) for row in rows]
    await connection.execute(
        update(messages)
        .where(
            messages.c.conversation_id == bindparam("b_conversation"),
            messages.c.hash == bindparam("b_hash"),
        )
        .values(
            body=bindparam("b_body"),
            content_text=None,
            content_in_text=False,
            content_dropped=True,
        ),
        [
            {"b_conversation": row["conversation_id"], "b_hash": row["hash"], "b_body": row["body"]}
            for row in stripped
        ],
    )
    touched = sorted({row["conversation_id"] for row in rows})
    if archived is None:
        c = completions.c
        dropping = and_(c.conversation_id.in_(touched), c.started_at < cutoff)
    else:  # those archived whole: the others keep their choices until their own step
        dropping = completions.c.id.in_(archived)
    await connection.execute(
        update(completions)
        .where(dropping, completions.c.extra_choices.isnot(None))
        .values(extra_choices=None)
    )
    await connection.execute(
        update(conversations)
        .where(
            conversations.c.id.in_(touched),
            conversations.c.created_at < cutoff,
            conversations.c.title.isnot(None),
        )
        .values(title=None)
    )
    return len(rows)


async def _same_time(connection: AsyncConnection, rows: Sequence[RowMapping]) -> list[RowMapping]:
    """The messages not in ``rows`` stored at the time of its last one (the rest of the
    record that stored it), whose content goes in the same step."""
    taken = {(row["conversation_id"], row["hash"]) for row in rows}
    query = select(*_CONTENT_COLUMNS).where(
        messages.c.created_at == rows[-1]["created_at"], messages.c.content_dropped == false()
    )
    found = (await connection.execute(query)).mappings().all()
    return [row for row in found if (row["conversation_id"], row["hash"]) not in taken]


async def _keep_content(
    connection: AsyncConnection, archive: Archive, rows: Sequence[RowMapping]
) -> list[str]:
    """Archive the completions whose answer (or, with none, the request's last message) is
    among the messages losing their content: the completion that stored each message, so
    each is archived once, with its whole request, before its content goes."""
    stored = {(row["conversation_id"], row["hash"]) for row in rows}
    touched = sorted({conversation_id for conversation_id, _ in stored})
    hashes = sorted({digest for _, digest in stored})
    c = completions.c
    ids = []
    for start in range(0, len(hashes), deletion.CHUNK):
        chunk = hashes[start : start + deletion.CHUNK]
        query = select(c.id, c.conversation_id, c.request_hash, c.response_hash).where(
            c.conversation_id.in_(touched),
            or_(c.response_hash.in_(chunk), c.request_hash.in_(chunk)),
        )
        for found in await connection.execute(query):
            tail = found.response_hash or found.request_hash
            if (found.conversation_id, tail) in stored:
                ids.append(found.id)
    kept = sorted(set(ids))
    await archiving.keep(connection, kept, [], archive=archive, reason="content")
    return kept
