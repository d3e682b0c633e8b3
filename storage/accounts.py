"""Users, their gateway keys and the audit log, in the main database.

A key is made here, handed back once, and from then on known only by its SHA-256
fingerprint; ``key_grant`` answers the one question the request path asks: whose is this
fingerprint, and may it be used.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.schema import api_keys, audit_log, users

KEY_PREFIX = "mes-"


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """Whose a key is (the user id, or its own fingerprint for a ``GATEWAY_KEYS`` key) and
    whether it may be used (not revoked, its user not disabled)."""

    owner: str
    active: bool


async def create_user(
    connection: AsyncConnection, name: str, email: str | None, metadata: dict[str, Any] | None
) -> RowMapping:
    user_id = "user_" + uuid.uuid4().hex[:24]
    await connection.execute(
        insert(users).values(
            id=user_id,
            name=name,
            email=email,
            metadata=None if metadata is None else orjson.dumps(metadata).decode(),
            created_at=now(),
        )
    )
    return await _one(connection, select(users).where(users.c.id == user_id))


async def user(connection: AsyncConnection, user_id: str) -> RowMapping | None:
    return (await connection.execute(select(users).where(users.c.id == user_id))).mappings().first()


async def list_users(
    connection: AsyncConnection, limit: int, after: str | None
) -> list[RowMapping]:
    query = select(users).order_by(users.c.id).limit(limit)
    if after is not None:
        query = query.where(users.c.id > after)
    return list((await connection.execute(query)).mappings())


async def set_disabled(connection: AsyncConnection, user_id: str, disabled: bool) -> bool:
    result = await connection.execute(
        update(users).where(users.c.id == user_id).values(disabled_at=now() if disabled else None)
    )
    return bool(result.rowcount)


async def update_user(
    connection: AsyncConnection, user_id: str, changes: dict[str, Any]
) -> RowMapping | None:
    """Set the user's ``name``, ``email`` or ``metadata`` as ``changes`` gives them; the
    user's row after, or None for no such user."""
    values = {**changes}
    if "metadata" in values and values["metadata"] is not None:
        values["metadata"] = orjson.dumps(values["metadata"]).decode()
    if values:
        await connection.execute(update(users).where(users.c.id == user_id).values(values))
    return await user(connection, user_id)


async def erase_user(connection: AsyncConnection, user_id: str) -> bool:
    """Erase the user from the main database: the user's row and keys go, and the audit
    log keeps what was done to them, no longer whom (its entries about the user, or one
    of their keys, lose their target and details). False for no such user."""
    keys = [
        row[0]
        for row in await connection.execute(
            select(api_keys.c.id).where(api_keys.c.user_id == user_id)
        )
    ]
    await connection.execute(delete(api_keys).where(api_keys.c.user_id == user_id))
    gone = await connection.execute(delete(users).where(users.c.id == user_id))
    if not gone.rowcount:
        return False
    about = audit_log.c.target.in_([user_id, *keys])
    await connection.execute(update(audit_log).where(about).values(target=ERASED, details=None))
    return True


async def issue_key(
    connection: AsyncConnection, user_id: str, name: str | None
) -> tuple[str, RowMapping]:
    """A new key for ``user_id``: the key itself (shown once) and its stored row."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = fingerprint(key)
    key_id = "key_" + uuid.uuid4().hex[:24]
    await connection.execute(
        insert(api_keys).values(
            fingerprint=digest,
            id=key_id,
            user_id=user_id,
            name=name,
            prefix=key[:12],
            source="admin",
            created_at=now(),
        )
    )
    return key, await _one(connection, select(api_keys).where(api_keys.c.id == key_id))


async def list_keys(connection: AsyncConnection, user_id: str) -> list[RowMapping]:
    query = select(api_keys).where(api_keys.c.user_id == user_id).order_by(api_keys.c.created_at)
    return list((await connection.execute(query)).mappings())


async def revoke_key(connection: AsyncConnection, key_id: str) -> RowMapping | None:
    """Revoke a key; its row (with its fingerprint, to forget it at once), or None."""
    row = (
        (await connection.execute(select(api_keys).where(api_keys.c.id == key_id)))
        .mappings()
        .first()
    )
    if row is None:
        return None
    if row["revoked_at"] is None:
        await connection.execute(
            update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now())
        )
    return await _one(connection, select(api_keys).where(api_keys.c.id == key_id))


async def key_grant(connection: AsyncConnection, digest: str) -> KeyGrant | None:
    query = (
        select(api_keys.c.user_id, api_keys.c.revoked_at, users.c.disabled_at)
        .select_from(api_keys.outerjoin(users, users.c.id == api_keys.c.user_id))
        .where(api_keys.c.fingerprint == digest)
    )
    row = (await connection.execute(query)).first()
    if row is None:
        return None
    user_id, revoked_at, disabled_at = row
    return KeyGrant(owner=user_id or digest, active=revoked_at is None and disabled_at is None)


# Who an audit entry was about, once that user is erased.
ERASED = "erased"


async def audit(
    connection: AsyncConnection,
    actor: str,
    action: str,
    target: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    await connection.execute(
        insert(audit_log).values(
            at=now(),
            actor=actor,
            action=action,
            target=target,
            details=None if details is None else orjson.dumps(details).decode(),
        )
    )


async def list_audit(
    connection: AsyncConnection, limit: int, after: int | None
) -> list[RowMapping]:
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if after is not None:
        query = query.where(audit_log.c.id < after)
    return list((await connection.execute(query)).mappings())


async def _one(connection: AsyncConnection, query: Any) -> RowMapping:
    return (await connection.execute(query)).mappings().one()
