"""Deleting history without breaking what remains.

Messages are shared: a conversation's later requests resend its earlier messages, stored
once. Deleting a completion therefore deletes only the messages no remaining completion of
its conversation reaches (its own answer and the tail of its request, typically), recounts
the conversation's totals, and deletes the conversation with its last completion. Each
conversation is locked while this happens, as the writer locks it, so a completion being
written at the same moment never points at a message just deleted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from storage import usage
from storage.batch import add_usage, lock_conversations
from storage.schema import completions, conversations, messages, request_logs
from storage.scope import Scope

CHUNK = 500
# Given the ids of the completions and request logs about to be deleted, in the deleting
# transaction: keeps them elsewhere first (an archive), or raises to stop the deletion.
Keep = Callable[[AsyncConnection, Sequence[str], Sequence[str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Deleted:
    completions: int = 0
    conversations: int = 0
    messages: int = 0
    request_logs: int = 0

    def __bool__(self) -> bool:
        return any((self.completions, self.conversations, self.messages, self.request_logs))

    def __add__(self, other: Deleted) -> Deleted:
        return Deleted(
            self.completions + other.completions,
            self.conversations + other.conversations,
            self.messages + other.messages,
            self.request_logs + other.request_logs,
        )


async def delete_completion(connection: AsyncConnection, scope: Scope, record_id: str) -> Deleted:
    return await _delete_where(connection, scope, completions.c.id == record_id)


async def delete_conversation(
    connection: AsyncConnection, scope: Scope, conversation_id: str
) -> Deleted:
    return await _delete_where(connection, scope, completions.c.conversation_id == conversation_id)


async def delete_owner_history(connection: AsyncConnection, scope: Scope) -> Deleted:
    """Everything of the scope's owner: completions, conversations, messages, request logs."""
    deleted = await _delete_where(connection, scope, completions.c.id.isnot(None))
    logs = await connection.scalar(
        select(func.count()).select_from(request_logs).where(scope.where(request_logs))
    )
    await connection.execute(delete(request_logs).where(scope.where(request_logs)))
    return deleted + Deleted(request_logs=int(logs or 0))


async def prune_step(
    connection: AsyncConnection,
    scope: Scope,
    cutoff: datetime,
    limit: int,
    keep: Keep | None = None,
) -> Deleted:
    """One small step of a prune: the old completions of at most ``limit`` conversations
    and at most ``limit`` old request logs. Empty when nothing older is left. Retention runs
    each step in a transaction of its own, so that no lock is held for long. ``keep`` is
    given what goes before it goes (``storage/archive.py``)."""
    deleted = await _delete_chunk(connection, scope, completions.c.started_at < cutoff, limit, keep)
    ids = list(
        (
            await connection.execute(
                select(request_logs.c.id)
                .where(scope.where(request_logs), request_logs.c.started_at < cutoff)
                .limit(limit)
            )
        ).scalars()
    )
    if ids:
        if keep is not None:
            await keep(connection, [], ids)
        await connection.execute(delete(request_logs).where(request_logs.c.id.in_(ids)))
        deleted += Deleted(request_logs=len(ids))
    return deleted


async def _delete_where(
    connection: AsyncConnection, scope: Scope, condition: ColumnElement[bool]
) -> Deleted:
    """Delete the scope's completions matching ``condition``, a chunk of conversations at a
    time, and tidy each conversation they leave behind."""
    total = Deleted()
    while step := await _delete_chunk(connection, scope, condition, CHUNK):
        total += step
    return total


async def _delete_chunk(
    connection: AsyncConnection,
    scope: Scope,
    condition: ColumnElement[bool],
    limit: int,
    keep: Keep | None = None,
) -> Deleted:
    """The completions matching ``condition`` of at most ``limit`` conversations. A
    conversation left without completions goes with all its messages, in a few statements
    for the whole chunk; one that keeps some is tidied on its own."""
    ids = list(
        (
            await connection.execute(
                select(completions.c.conversation_id)
                .where(scope.where(completions), condition)
                .distinct()
                .order_by(completions.c.conversation_id)
                .limit(limit)
            )
        ).scalars()
    )
    if not ids:
        return Deleted()
    await lock_conversations(connection, ids)
    # Counted from the rows found, not the driver's rowcount: on SQLite split by day,
    # completions is a view, and changes made through its triggers count as none.
    found = (
        await connection.execute(
            select(completions.c.id, *(completions.c[name] for name in usage.COLUMNS)).where(
                scope.where(completions), condition, completions.c.conversation_id.in_(ids)
            )
        )
    ).mappings()
    counted = usage.Tally()
    doomed = []
    for row in found:
        doomed.append(row["id"])
        counted.add(row, sign=-1)
    if keep is not None:
        await keep(connection, doomed, [])
    for start in range(0, len(doomed), CHUNK):
        await connection.execute(
            delete(completions).where(completions.c.id.in_(doomed[start : start + CHUNK]))
        )
    await add_usage(connection, counted)
    return Deleted(completions=len(doomed)) + await _tidy_all(connection, ids)


async def drop_conversations(connection: AsyncConnection, ids: Sequence[str]) -> Deleted:
    """Conversations whose completions went another way (a day's partition dropped): the
    ones left without any go with their messages; the others are tidied."""
    await lock_conversations(connection, ids)
    return await _tidy_all(connection, ids)


async def tidy_if_changed(connection: AsyncConnection, recorded: dict[str, int]) -> Deleted:
    """Tidy the conversations whose recorded count of completions is no longer right."""
    counts: dict[str, int] = dict(
        (
            await connection.execute(
                select(completions.c.conversation_id, func.count())
                .where(completions.c.conversation_id.in_(sorted(recorded)))
                .group_by(completions.c.conversation_id)
            )
        ).all()
    )
    changed = sorted(i for i, count in recorded.items() if counts.get(i, 0) != count)
    if not changed:
        return Deleted()
    await lock_conversations(connection, changed)
    return await _tidy_all(connection, changed)


async def _tidy_all(connection: AsyncConnection, ids: Sequence[str]) -> Deleted:
    """After some of their completions went: conversations left without any go with all
    their messages, in a few statements for them all; the others are tidied one by one."""
    kept = set(
        (
            await connection.execute(
                select(completions.c.conversation_id)
                .where(completions.c.conversation_id.in_(ids))
                .distinct()
            )
        ).scalars()
    )
    total = Deleted()
    emptied = [conversation_id for conversation_id in ids if conversation_id not in kept]
    if emptied:
        gone_messages = await connection.execute(
            delete(messages).where(messages.c.conversation_id.in_(emptied))
        )
        gone = await connection.execute(
            delete(conversations).where(conversations.c.id.in_(emptied))
        )
        total += Deleted(conversations=gone.rowcount or 0, messages=gone_messages.rowcount or 0)
    for conversation_id in sorted(kept):
        total += await _tidy(connection, conversation_id)
    return total


async def _tidy(connection: AsyncConnection, conversation_id: str) -> Deleted:
    """Drop the messages of a conversation that no remaining completion reaches, and the
    conversation itself when none remains; recount its totals otherwise."""
    remaining = (
        await connection.execute(
            select(completions.c.request_hash, completions.c.response_hash).where(
                completions.c.conversation_id == conversation_id
            )
        )
    ).all()
    tree = dict(
        (
            await connection.execute(
                select(messages.c.hash, messages.c.parent_hash).where(
                    messages.c.conversation_id == conversation_id
                )
            )
        ).all()
    )
    reached: set[str] = set()
    for tails in remaining:
        for tail in tails:
            while tail and tail not in reached and tail in tree:
                reached.add(tail)
                tail = tree[tail]
    unused = sorted(set(tree) - reached)
    removed = 0
    for start in range(0, len(unused), CHUNK):
        result = await connection.execute(
            delete(messages).where(
                messages.c.conversation_id == conversation_id,
                messages.c.hash.in_(unused[start : start + CHUNK]),
            )
        )
        removed += result.rowcount or 0
    if not remaining:
        result = await connection.execute(
            delete(conversations).where(conversations.c.id == conversation_id)
        )
        return Deleted(conversations=result.rowcount or 0, messages=removed)
    sums = (
        await connection.execute(
            select(
                func.count(),
                func.coalesce(func.sum(completions.c.prompt_tokens), 0),
                func.coalesce(func.sum(completions.c.completion_tokens), 0),
                func.coalesce(func.sum(completions.c.total_tokens), 0),
            ).where(completions.c.conversation_id == conversation_id)
        )
    ).one()
    await connection.execute(
        update(conversations)
        .where(conversations.c.id == conversation_id)
        .values(
            completion_count=sums[0],
            prompt_tokens=sums[1],
            completion_tokens=sums[2],
            total_tokens=sums[3],
            message_count=len(tree) - removed,
        )
    )
    return Deleted(messages=removed)
