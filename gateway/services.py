"""The gateway's long-lived objects, made once in the lifespan and handed to every request as
one typed ``Services``: the database engines, the history writer and its spool, the
upstreams, the proxy, the stored-completions API, maintenance, metrics. Endpoints reach them
with ``services(request)``; nothing is read back by name.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import HTTPConnection

from capture.rows import Record
from gateway.auth import Authenticator
from gateway.maintenance import Maintenance
from gateway.metrics import Metrics, render_series
from gateway.proxy import Proxy
from gateway.routing import Router
from gateway.sessions import Sessions
from gateway.settings import Settings
from gateway.stored_completions import StoredCompletions
from gateway.upstream import Transport, Upstream
from gateway.upstream_pool import UpstreamPool
from storage import accounts
from storage.accounts import KeyGrant
from storage.batch import insert_ignore
from storage.database import SchemaOutdated, check_schema, create_engine, prepare_schema
from storage.dsn import parse_dsn
from storage.partitions import Partitions
from storage.prices import provider_of
from storage.schema import api_keys
from storage.spool import Spool
from storage.writer import adopt
from storage.writer_process import BATCH_BUCKETS, WriterConfig, WriterProcess

log = logging.getLogger("mes.app")

# The longest the gateway waits for its databases at start before it serves: a database
# that refuses is known at once, one that does not answer within this is waited for in the
# background (its DB_CONNECT_TIMEOUT bounds each try).
START_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    main_engine: AsyncEngine
    history_engine: AsyncEngine
    # Where the read APIs and the viewer read history: a replica (MES_SQL_READ_DSN), or the
    # history database itself. Writes, retention and migrations stay on the primary.
    history_reader: AsyncEngine
    authenticator: Authenticator
    metrics: Metrics
    writer: WriterProcess
    maintenance: Maintenance
    router: Router
    proxy: Proxy
    stored: StoredCompletions
    ui_sessions: Sessions
    main_setup: asyncio.Task[None]  # the main database created and migrated (or checked)

    @property
    def set_up(self) -> bool:
        """Both databases are created and at their schema: the history one by the writer."""
        main = self.main_setup
        ok = main.done() and not main.cancelled() and main.exception() is None
        return ok and self.writer.ready

    @property
    def engines(self) -> dict[str, AsyncEngine]:
        """Each database by the name ``/readyz`` gives it (one, when both share a DSN)."""
        return _named_engines(self.main_engine, self.history_engine, self.history_reader)


def _named_engines(
    main: AsyncEngine, history: AsyncEngine, reader: AsyncEngine
) -> dict[str, AsyncEngine]:
    engines = {"main": main}
    if history is not main:
        engines["history"] = history
    if reader is not history:
        engines[REPLICA] = reader
    return engines


REPLICA = "history_replica"  # a database the gateway only reads: not needed to be ready


def services(connection: HTTPConnection) -> Services:
    """The services of the app serving ``connection``."""
    found: Services = connection.state.services
    return found


def build_router(settings: Settings, transport: Transport | None = None) -> Router:
    """The upstreams the settings name, on one connection pool of the gateway's own (it
    needs the running event loop: made in the lifespan), or on ``transport`` (a test's)."""
    transport = transport or UpstreamPool(
        max_connections=settings.upstream_max_connections,
        connect_timeout=settings.upstream_connect_timeout,
        timeout=settings.upstream_timeout,
    )
    if not settings.upstreams:
        return Router([Upstream(settings.upstream_base_url, settings.upstream_api_key, transport)])
    return Router(
        [
            Upstream(
                spec.base_url,
                spec.api_key,
                transport,
                name=spec.name,
                format=spec.format,
                models=spec.models,
                fallbacks=spec.fallbacks,
            )
            for spec in settings.upstreams
        ]
    )


def writer_config(settings: Settings) -> WriterConfig:
    return WriterConfig(
        history_dsn=settings.history_dsn,
        pool=settings.pool,
        daily_partition=settings.mes_daily_partition,
        spool_dir=settings.spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
        batch_size=settings.capture_batch_size,
        flush_interval=settings.capture_flush_interval,
        retry_seconds=settings.capture_retry_seconds,
        nice=settings.writer_nice,
        redact_patterns=settings.redact_patterns,
        capture_content=settings.capture_content,
        shutdown_grace=settings.shutdown_grace_seconds,
        log_level=settings.log_level,
        log_format=settings.log_format,
        providers={
            spec.name: provider_of(spec.base_url, spec.provider) for spec in settings.upstreams
        }
        or {"default": provider_of(settings.upstream_base_url, None)},
        prices_file=settings.prices_file,
        auto_migrate=settings.auto_migrate,
        otel=settings.otel_enabled,
        otel_content=settings.otel_content,
        queue=settings.queue_url,
        queue_durable_seconds=settings.queue_durable_seconds,
    )


@asynccontextmanager
async def running(
    settings: Settings, transport: Transport | None = None
) -> AsyncIterator[Services]:
    """Make every service, serve while the block runs, then stop them in order. A database
    that is down at start does not stop the gateway: requests are served and spooled, and
    the databases are set up as soon as they answer. ``transport`` carries requests to the
    upstreams instead of the gateway's own pool (a test's fake)."""
    main_engine = create_engine(parse_dsn(settings.main_dsn), **settings.pool)
    history_engine = main_engine
    if settings.history_dsn != settings.main_dsn:
        history_engine = create_engine(parse_dsn(settings.history_dsn), **settings.pool)
    history_reader = history_engine
    if settings.mes_sql_read_dsn and settings.mes_sql_read_dsn != settings.history_dsn:
        history_reader = create_engine(parse_dsn(settings.mes_sql_read_dsn), **settings.pool)

    async def lookup(digest: str) -> KeyGrant | None:
        async with main_engine.connect() as connection:
            return await accounts.key_grant(connection, digest)

    authenticator = Authenticator(settings.gateway_keys, settings.managed_mode, lookup)

    async def prepare_main() -> None:
        await prepare_schema(
            main_engine,
            settings.main_dsn,
            "main",
            auto_migrate=settings.auto_migrate,
            connect_timeout=settings.db_connect_timeout,
        )
        if not settings.auto_migrate:  # the writer would only find out later, and retry
            await check_schema(history_engine, "history")
        await _register_gateway_keys(main_engine, authenticator.fingerprints)

    registry = Metrics()
    spool = Spool(Path(settings.spool_dir), settings.spool_max_bytes)
    spool.open()
    writer = WriterProcess(writer_config(settings), spool, registry)
    registry.shared = writer.counters
    registry.shared_costs = writer.costs
    writer.start()  # its imports overlap the main database's setup
    registry.gauges["queue_depth"] = lambda: writer.depth
    registry.gauges["spool_bytes"] = lambda: spool.pending_bytes
    registry.gauges["writer_stalled_seconds"] = lambda: writer.stalled_seconds
    registry.shared_histograms = partial(_writer_batches, writer)
    engines = _named_engines(main_engine, history_engine, history_reader)
    registry.labelled["db_pool_connections"] = partial(_pool_connections, engines)
    main_tried = asyncio.Event()
    background = [asyncio.create_task(_until_done(prepare_main, "main", main_tried))]
    await _first_try(main_tried)  # the writer sets the history database up on its own
    if background[0].done() and isinstance(background[0].exception(), SchemaOutdated):
        raise background[0].exception()  # type: ignore[misc]  # refuse to start
    for orphan in spool.orphans():
        background.append(asyncio.create_task(adopt(orphan, spool, registry, writer.appended)))
    wanted = Partitions(history_engine) if settings.mes_daily_partition else None
    maintenance = Maintenance(settings, history_engine, main_engine, registry, wanted)
    main_ready = background[0]

    async def databases_ready() -> None:
        await writer.ready_event.wait()
        await asyncio.shield(main_ready)

    maintenance.start(databases_ready)
    router = build_router(settings, transport)
    capture = writer.submit if settings.capture else _not_captured
    started = Services(
        settings=settings,
        main_engine=main_engine,
        history_engine=history_engine,
        history_reader=history_reader,
        authenticator=authenticator,
        metrics=registry,
        writer=writer,
        maintenance=maintenance,
        router=router,
        proxy=Proxy(settings, router, authenticator, capture, registry),
        stored=StoredCompletions(history_engine, history_reader, main_engine, authenticator),
        ui_sessions=Sessions(settings),
        main_setup=main_ready,
    )
    # Everything made at start (modules, routes, schemas, pools) moves out of the cyclic
    # garbage collector's reach: its full collections had to walk it all, stalling every
    # request in flight (bench/speed.py: p99 at concurrency 16 several times lower).
    gc.collect()
    gc.freeze()
    log.info(
        "MES Gateway ready: %s, %s mode",
        ", ".join(
            f"upstream {u.name} {u.base_url} ({u.format}: {','.join(u.models)})"
            if not router.single
            else f"upstream {u.base_url}"
            for u in router.upstreams
        ),
        "managed" if settings.managed_mode else "pass-through",
    )
    try:
        yield started
    finally:
        for task in background:
            task.cancel()
        await maintenance.close()
        await writer.close(settings.shutdown_grace_seconds)
        await router.upstreams[0].transport.close()  # one pool for them all
        for engine in started.engines.values():
            await engine.dispose()


def _writer_batches(writer: WriterProcess, lines: list[str]) -> None:
    lines.append(
        "# HELP mes_writer_batch_seconds Batches the history writer wrote, by the time from "
        "their first try to their commit (retries included)."
    )
    lines.append("# TYPE mes_writer_batch_seconds histogram")
    render_series(lines, "mes_writer_batch_seconds", {}, BATCH_BUCKETS, writer.batches())


def _pool_connections(
    engines: dict[str, AsyncEngine],
) -> tuple[str, dict[tuple[tuple[str, str], ...], float]]:
    """This process's database connections in use, idle, and requests waiting for one, by
    database (the writer process has a pool of its own)."""
    values: dict[tuple[tuple[str, str], ...], float] = {}
    for name, engine in engines.items():
        pool = engine.pool
        in_use = getattr(pool, "checkedout", lambda: 0)()
        idle = getattr(pool, "checkedin", lambda: 0)()
        # SQLAlchemy's async pool queue: its asyncio.Queue, once made, knows its waiters.
        queue = getattr(pool, "_pool", None)
        waiting = len(getattr(vars(queue).get("_queue") if queue else None, "_getters", ()))
        for state, count in (("in_use", in_use), ("idle", idle), ("waiting", waiting)):
            values[(("database", name), ("state", state))] = count
    about = "Database connections of this process, by database and state (in use, idle, waiting)."
    return about, values


def _not_captured(record: Record) -> bool:
    """``MES_CAPTURE=false``: the gateway proxies and records nothing."""
    return False


async def _until_done(step: Callable[[], Awaitable[None]], name: str, tried: asyncio.Event) -> None:
    """Run ``step`` (create and migrate a database) until it succeeds, backing off; set
    ``tried`` once the first try is over, whichever way it went. A schema that is not this
    gateway's, with migrations left to a DBA, is not retried."""
    delay = 0.5
    while True:
        try:
            await step()
            return
        except SchemaOutdated as error:
            log.critical("%s", error)
            raise
        except Exception as error:  # down, unreachable or refusing: log, wait, try again
            log.warning(
                "%s database not ready (%s: %s): retrying", name, type(error).__name__, error
            )
        finally:
            tried.set()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def _first_try(tried: asyncio.Event) -> None:
    """Wait for the first try at setting up the main database (over at once for one that
    is down), for at most ``START_SECONDS``: the gateway serves within them whatever state
    its databases are in, and spools history until they can take it."""
    try:
        await asyncio.wait_for(tried.wait(), START_SECONDS)
    except TimeoutError:
        log.warning("a database is slow to set up: serving, and spooling history meanwhile")


async def _register_gateway_keys(engine: AsyncEngine, fingerprints: frozenset[str]) -> None:
    if not fingerprints:
        return
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [
        {"fingerprint": f, "id": f"key_{f[:24]}", "name": None, "source": "env", "created_at": now}
        for f in sorted(fingerprints)
    ]
    async with engine.begin() as connection:
        await connection.execute(insert_ignore(connection, api_keys), rows)
