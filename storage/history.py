"""Reading captured history back: completions, and the exact messages of any request."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.schema import completions, messages

JSON = dict[str, Any]


async def completion(connection: AsyncConnection, completion_id: str) -> RowMapping | None:
    result = await connection.execute(select(completions).where(completions.c.id == completion_id))
    return result.mappings().first()


async def chain_to(
    connection: AsyncConnection, conversation_id: str, tail_hash: str | None
) -> list[JSON]:
    """The messages from the root of a conversation down to ``tail_hash``, in order."""
    if tail_hash is None:
        return []
    rows = await connection.execute(
        select(messages.c.hash, messages.c.parent_hash, messages.c.body).where(
            messages.c.conversation_id == conversation_id
        )
    )
    by_hash = {row.hash: (row.parent_hash, row.body) for row in rows}
    ordered: list[JSON] = []
    current: str | None = tail_hash
    while current:
        parent, body = by_hash[current]
        ordered.append(orjson.loads(body))
        current = parent
    ordered.reverse()
    return ordered


async def request_messages(connection: AsyncConnection, row: RowMapping) -> list[JSON]:
    """The ``messages`` list of a captured request, exactly as the client sent it."""
    return await chain_to(connection, row["conversation_id"], row["request_hash"])


async def answer_message(connection: AsyncConnection, row: RowMapping) -> JSON | None:
    """The assistant message a completion answered with (its first choice)."""
    if row["response_hash"] is None:
        return None
    result = await connection.execute(
        select(messages.c.body).where(
            messages.c.conversation_id == row["conversation_id"],
            messages.c.hash == row["response_hash"],
        )
    )
    body = result.scalar_one_or_none()
    return None if body is None else orjson.loads(body)
