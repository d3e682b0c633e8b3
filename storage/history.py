"""Reading captured history back: completions, and the exact messages of any request."""

from __future__ import annotations

from typing import Any

from sqlalchemy import literal, select, text
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from capture.message_rows import stored_message
from storage.schema import completions, messages

JSON = dict[str, Any]
MAX_CHAIN = 1_000_000  # messages in one request, far beyond any context window
STORED = (messages.c.body, messages.c.content_text, messages.c.content_in_text)


async def completion(connection: AsyncConnection, completion_id: str) -> RowMapping | None:
    result = await connection.execute(select(completions).where(completions.c.id == completion_id))
    return result.mappings().first()


async def chain_to(
    connection: AsyncConnection, conversation_id: str, tail_hash: str | None
) -> list[JSON]:
    """The messages from the root of a conversation down to ``tail_hash``, in order.

    One recursive query up the parent links, so a conversation with many branches costs
    only the branch asked for.
    """
    if tail_hash is None:
        return []
    walk = (
        select(*STORED, messages.c.parent_hash, literal(0).label("depth"))
        .where(messages.c.conversation_id == conversation_id, messages.c.hash == tail_hash)
        .cte("walk", recursive=True)
    )
    parent = messages.alias("parent")
    walk = walk.union_all(
        select(
            parent.c.body,
            parent.c.content_text,
            parent.c.content_in_text,
            parent.c.parent_hash,
            walk.c.depth + 1,
        ).where(parent.c.conversation_id == conversation_id, parent.c.hash == walk.c.parent_hash)
    )
    await _allow_deep_recursion(connection)
    rows = list(
        (
            await connection.execute(
                select(
                    walk.c.body, walk.c.content_text, walk.c.content_in_text, walk.c.parent_hash
                ).order_by(walk.c.depth.desc())
            )
        ).mappings()
    )
    if not rows or rows[0]["parent_hash"] is not None:
        raise LookupError(f"conversation {conversation_id}: the chain to {tail_hash} is broken")
    return [stored_message(row) for row in rows]


async def _allow_deep_recursion(connection: AsyncConnection) -> None:
    """MariaDB and MySQL stop a recursive query after 1,000 steps (MariaDB silently); an
    agent's request can be longer than that."""
    if connection.dialect.name != "mysql":
        return
    variable = (
        "max_recursive_iterations"
        if getattr(connection.dialect, "is_mariadb", False)
        else "cte_max_recursion_depth"
    )
    await connection.execute(text(f"SET SESSION {variable} = {MAX_CHAIN}"))


async def request_messages(connection: AsyncConnection, row: RowMapping) -> list[JSON]:
    """The ``messages`` list of a captured request, exactly as the client sent it: the last
    ``request_message_count`` of its chain (see ``browse.Rebuilder.request``)."""
    chain = await chain_to(connection, row["conversation_id"], row["request_hash"])
    count = row["request_message_count"]
    return chain[len(chain) - count :] if 0 <= count < len(chain) else chain


async def answer_message(connection: AsyncConnection, row: RowMapping) -> JSON | None:
    """The assistant message a completion answered with (its first choice)."""
    if row["response_hash"] is None:
        return None
    result = await connection.execute(
        select(*STORED).where(
            messages.c.conversation_id == row["conversation_id"],
            messages.c.hash == row["response_hash"],
        )
    )
    stored = result.mappings().first()
    return None if stored is None else stored_message(stored)
