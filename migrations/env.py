"""Alembic's entry point: runs one target's migrations on a connection.

The gateway passes an open connection in ``config.attributes``; the ``alembic`` command line
gives none, and then the DSN comes from the environment as the gateway reads it.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

config = context.config
target = config.attributes.get("target") or context.get_x_argument(as_dictionary=True).get(
    "target", "history"
)


def run(connection: Connection) -> None:
    context.configure(connection=connection, version_table=f"alembic_version_{target}")
    with context.begin_transaction():
        context.run_migrations()


def run_from_environment() -> None:
    from gateway.settings import Settings
    from storage.database import create_engine, ensure_database

    settings = Settings.from_env()
    dsn = settings.main_dsn if target == "main" else settings.history_dsn

    async def upgrade() -> None:
        url = await ensure_database(dsn)
        engine = create_engine(url, pool_size=1)
        async with engine.begin() as connection:
            await connection.run_sync(run)
        await engine.dispose()

    asyncio.run(upgrade())


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    run_from_environment()
