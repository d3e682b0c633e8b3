"""Named locks that several gateway processes, on one machine or many, take in one database.

Migrations and maintenance (retention, partitions) must run in one process at a time when
several replicas share a database. Each backend has its own kind of named lock, held by a
session and released when it ends, so that a replica that dies lets go:
PostgreSQL's advisory locks, MySQL's and MariaDB's ``GET_LOCK``, and for SQLite (one
machine by nature) an exclusive ``flock`` on a file beside the database.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

# MySQL waits at most this long in one GET_LOCK call; a waiting replica asks again.
_MYSQL_WAIT_SECONDS = 60


@asynccontextmanager
async def named_lock(engine: AsyncEngine, name: str, *, wait: bool) -> AsyncIterator[bool]:
    """Hold the lock ``name`` in ``engine``'s database for the block. With ``wait`` the block
    starts once the lock is held (always True); without, it yields False at once when
    another process holds it."""
    kind = engine.dialect.name
    if kind == "sqlite":
        async with _file_lock(engine, name, wait=wait) as held:
            yield held
        return
    async with engine.connect() as connection:
        if kind == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            statement = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
            held = await connection.scalar(text(f"SELECT {statement}(:key)"), {"key": key})
            held = True if wait else bool(held)
            release: tuple[Any, dict[str, Any]] = (
                text("SELECT pg_advisory_unlock(:key)"),
                {"key": key},
            )
        else:
            held = False
            while True:
                got = await connection.scalar(
                    text("SELECT GET_LOCK(:name, :seconds)"),
                    {"name": name, "seconds": _MYSQL_WAIT_SECONDS if wait else 0},
                )
                held = got == 1
                if held or not wait:
                    break
            release = text("SELECT RELEASE_LOCK(:name)"), {"name": name}
        # Not inside a transaction of its own: end the one the lock statement began.
        await connection.commit()
        try:
            yield held
        finally:
            if held:
                await connection.execute(*release)
                await connection.commit()


@asynccontextmanager
async def _file_lock(engine: AsyncEngine, name: str, *, wait: bool) -> AsyncIterator[bool]:
    database = engine.url.database
    if not database or database == ":memory:":
        yield True  # a database no other process can open
        return
    path = f"{database}.{name}.lock"  # beside the database file, as its -wal file is
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            await asyncio.to_thread(fcntl.flock, descriptor, flags)
            held = True
        except BlockingIOError:
            held = False
        try:
            yield held
        finally:
            if held:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
