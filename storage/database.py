"""Engines for the main and history databases: created, migrated and checked on start."""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from migrations import MIGRATIONS_DIR
from storage.dsn import TLS, DatabaseURL, parse_dsn
from storage.locks import named_lock

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("mes.storage")

_SAFE_DATABASE_NAME = re.compile(r"^[A-Za-z0-9_$-]{1,63}$")


# Seconds a database server may take to accept a connection (DB_CONNECT_TIMEOUT).
CONNECT_TIMEOUT = 5.0


class DatabaseSetupError(RuntimeError):
    """The database could not be created or migrated at start."""


def create_engine(
    database: DatabaseURL,
    pool_size: int = 5,
    *,
    max_overflow: int | None = None,
    recycle: float = 1800.0,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncEngine:
    """An async engine tuned per backend: WAL SQLite, pinged pools for the servers. A pool
    holds ``pool_size`` connections, and ``max_overflow`` more (as many again, by default)
    while it is busy; a connection is replaced after ``recycle`` seconds; a server that
    does not answer within ``connect_timeout`` seconds fails the connection attempt."""
    if database.kind == "sqlite":
        engine = create_async_engine(database.url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": pool_size if max_overflow is None else max_overflow,
        "pool_pre_ping": True,
        "pool_recycle": recycle,
        # The connection used last is used next: a few connections do the work, their
        # caches warm (a query over a table split into 200 days plans in 25 ms on a
        # PostgreSQL connection that planned it before, in 160 ms on one that did not).
        "pool_use_lifo": True,
        "connect_args": _connect_args(database, connect_timeout),
    }
    if database.kind == "mysql":
        # Each statement sees what others committed, as on PostgreSQL: a writer that waited
        # for a conversation's lock then counts the messages the other writer added.
        options["isolation_level"] = "READ COMMITTED"
    if database.kind == "postgresql":
        # asyncpg prepares every statement, and after five runs PostgreSQL may settle on a
        # generic plan for it, made while the table was small: a sequential scan that it
        # then keeps as the table grows (the writer's "id IN (...)" checks slowed many times
        # over that way). Plans made for each run's parameters cost a little planning and
        # follow the data, also for owners with very different amounts of history.
        options["connect_args"]["server_settings"] = {"plan_cache_mode": "force_custom_plan"}
    return _server_engine(database, database.url, **options)


def _server_engine(database: DatabaseURL, url: URL, **options: Any) -> AsyncEngine:
    """An engine on ``url``, a server of ``database``'s, that refuses a MySQL connection
    without TLS where the DSN requires it. asyncpg refuses one itself; aiomysql goes on in
    plain text when the server offers no TLS, so each new connection is asked."""
    engine = create_async_engine(url, **options)
    if database.kind == "mysql" and database.tls is not None and database.tls.required:
        event.listen(engine.sync_engine, "connect", _refuse_plain_text)
    return engine


class DatabaseTLSError(DatabaseSetupError):
    """The DSN asks for TLS that cannot be had: certificate files that cannot be read, or
    a server that does not offer it."""


def _refuse_plain_text(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    row = cursor.fetchone()
    cursor.close()
    if not row or not row[1]:
        dbapi_connection.close()
        raise DatabaseTLSError("the MySQL server offers no TLS, and the DSN requires it")


def tls_context(tls: TLS) -> ssl.SSLContext:
    """The SSL context for ``tls``: its CA (or the system's), its checks, its client
    certificate."""
    for path in (tls.ca, tls.cert, tls.key):
        if path is not None and not Path(path).is_file():
            raise DatabaseTLSError(f"the DSN names {path} for TLS, and there is no such file")
    try:
        context = ssl.create_default_context(cafile=tls.ca)
        context.check_hostname = tls.verify == "full"
        if tls.verify == "none":
            context.verify_mode = ssl.CERT_NONE
        if tls.cert:
            context.load_cert_chain(tls.cert, tls.key, tls.key_password)
    except (OSError, ssl.SSLError) as exc:
        raise DatabaseTLSError(f"the DSN's TLS files: {exc}") from None
    return context


def _connect_args(database: DatabaseURL, connect_timeout: float) -> dict[str, Any]:
    """The connect timeout, by the driver's own name for it, unless the DSN sets it; the
    SSL context where the DSN asks for TLS."""
    if database.kind == "postgresql":
        name, value = "timeout", connect_timeout
    else:
        name, value = "connect_timeout", max(1, math.ceil(connect_timeout))  # whole seconds
    args: dict[str, Any] = {} if name in database.url.query else {name: value}
    if database.tls is not None:
        args["ssl"] = tls_context(database.tls)
    return args


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    if not SQLITE_HAS_LN:  # statistics bucket latencies by their logarithm
        dbapi_connection.create_function("ln", 1, natural_log, deterministic=True)


def _has_ln() -> bool:
    """Whether this SQLite was built with its math functions (3.35 and later, usually)."""
    try:
        sqlite3.connect(":memory:").execute("SELECT ln(1)")
    except sqlite3.OperationalError:
        return False
    return True


def natural_log(value: float | None) -> float | None:
    """SQL's ``ln()``, for an SQLite without it: NULL where it is undefined, as there."""
    return math.log(value) if isinstance(value, (int, float)) and value > 0 else None


SQLITE_HAS_LN = _has_ln()


async def ensure_database(dsn: str, connect_timeout: float = CONNECT_TIMEOUT) -> DatabaseURL:
    """Parse ``dsn`` and create its database when it does not exist yet."""
    database = parse_dsn(dsn)
    if database.kind == "sqlite":
        name = database.database
        if name and name != ":memory:":
            # At start, before any request: a blocking mkdir harms nobody.
            Path(name).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
        return database
    name = database.database
    if not name or not _SAFE_DATABASE_NAME.match(name):
        raise DatabaseSetupError(
            f"database name {name!r} in {database.rendered()} must be letters, digits, _ $ or -"
        )
    if database.kind == "postgresql":
        await _create_postgres_database(database, name, connect_timeout)
    else:
        await _create_mysql_database(database, name, connect_timeout)
    return database


async def _create_postgres_database(
    database: DatabaseURL, name: str, connect_timeout: float
) -> None:
    server = _server_engine(
        database,
        database.url.set(database="postgres"),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args=_connect_args(database, connect_timeout),
    )
    try:
        async with server.connect() as connection:
            exists = await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if not exists:
                quoted = connection.dialect.identifier_preparer.quote_identifier(name)
                log.info("creating PostgreSQL database %s", name)
                try:
                    await connection.execute(text(f"CREATE DATABASE {quoted} ENCODING 'UTF8'"))
                except DBAPIError:
                    # Created meanwhile by another replica, or by this gateway's own writer
                    # process (same DSN): 42P04 "already exists", or, when both CREATE
                    # DATABASE ran at once, a unique violation on pg_database_datname_index.
                    created = await connection.scalar(
                        text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                    )
                    if not created:
                        raise
    finally:
        await server.dispose()


async def _create_mysql_database(database: DatabaseURL, name: str, connect_timeout: float) -> None:
    url = database.url
    # URL.set() takes database=None as "unchanged"; the server connection needs no database.
    server_url = URL.create(
        url.drivername, url.username, url.password, url.host, url.port, None, url.query
    )
    server = _server_engine(
        database,
        server_url,
        poolclass=NullPool,
        connect_args=_connect_args(database, connect_timeout),
    )
    try:
        async with server.connect() as connection:
            quoted = connection.dialect.identifier_preparer.quote_identifier(name)
            await connection.execute(
                text(
                    f"CREATE DATABASE IF NOT EXISTS {quoted} "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
            )
    finally:
        await server.dispose()


def alembic_config(target: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(MIGRATIONS_DIR / target / "versions"))
    config.attributes["target"] = target
    return config


async def migrate(engine: AsyncEngine, target: str, revision: str = "head") -> None:
    """Apply ``target``'s migrations ("main" or "history") up to ``revision``. Replicas that
    start together take turns: the first migrates, the others then find nothing to do.

    A database already at the newest revision (every start but the first) is told so by one
    query, without Alembic, whose import costs a process start-up time and memory for
    good."""
    if revision == "head" and await _current_revision(engine, target) == newest_revision(target):
        return

    def upgrade(connection: Connection) -> None:
        from alembic import command

        config = alembic_config(target)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with named_lock(engine, f"mes-migrate-{target}", wait=True):
        async with engine.begin() as connection:
            await connection.run_sync(upgrade)


class SchemaOutdated(DatabaseSetupError):
    """With ``MES_AUTO_MIGRATE=false``: a database whose schema is not this gateway's."""

    def __init__(self, target: str, current: str | None, newest: str) -> None:
        super().__init__(
            f"the {target} database's schema is {current or 'not there'}, this gateway needs "
            f"{newest}, and MES_AUTO_MIGRATE=false: run `python -m gateway migrate` "
            "(or `mes-gateway migrate`) with the same environment, then start it again"
        )


async def check_schema(engine: AsyncEngine, target: str) -> None:
    """Raise ``SchemaOutdated`` unless ``target``'s schema is at the newest revision."""
    current, newest = await _current_revision(engine, target), newest_revision(target)
    if current != newest:
        raise SchemaOutdated(target, current, newest)


async def prepare_schema(
    engine: AsyncEngine, dsn: str, target: str, *, auto_migrate: bool, connect_timeout: float
) -> None:
    """Create ``target``'s database and migrate it, or, where a DBA applies migrations
    (``auto_migrate`` false), only check that it is at the newest revision."""
    if auto_migrate:
        await ensure_database(dsn, connect_timeout)
        await migrate(engine, target)
    else:
        await check_schema(engine, target)


def newest_revision(target: str) -> str:
    """``target``'s head revision, named by its newest migration's file: ``history_0005``
    for ``history_0005_usage_daily.py`` (``tests/test_migrations.py`` holds Alembic to it)."""
    newest = max(path.stem for path in (MIGRATIONS_DIR / target / "versions").glob("*_[0-9]*.py"))
    return "_".join(newest.split("_")[:2])


async def _current_revision(engine: AsyncEngine, target: str) -> str | None:
    """The revision ``target``'s version table records; None where there is none yet."""
    try:
        async with engine.connect() as connection:
            found = await connection.scalar(
                text(f"SELECT version_num FROM alembic_version_{target}")
            )
    except DBAPIError:  # no version table: a new database
        return None
    return str(found) if found is not None else None


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
