"""Alembic's entry point: runs one target's migrations on a connection.

The gateway passes an open connection in ``config.attributes`` (``python -m gateway
migrate``, or its start). The ``alembic`` command line passes the database as a SQLAlchemy
URL: ``alembic -c config/alembic.ini -x target=history -x url=postgresql+asyncpg://...``.
Migrations import nothing of the gateway's code: what one does never changes with it.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

config = context.config
target = config.attributes.get("target") or context.get_x_argument(as_dictionary=True).get(
    "target", "history"
)


def run(connection: Connection) -> None:
    context.configure(connection=connection, version_table=f"alembic_version_{target}")
    with context.begin_transaction():
        context.run_migrations()


def run_from_command_line() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit(
            "name the database with -x url=<SQLAlchemy URL>, such as "
            "-x url=postgresql+asyncpg://user:password@host/db, or run "
            "`python -m gateway migrate`, which reads the gateway's own variables"
        )

    async def upgrade() -> None:
        engine = create_async_engine(url, poolclass=NullPool)
        async with engine.begin() as connection:
            await connection.run_sync(run)
        await engine.dispose()

    asyncio.run(upgrade())


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    run_from_command_line()
