"""``create_app(settings)`` assembles the gateway; the lifespan owns every long-lived object
(database engines, the history writer, the upstream client) and hands them to requests as
lifespan state. Nothing is done on import."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from capture.registry import ROUTES
from gateway.asgi import Receive, Scope, Send, send_error
from gateway.auth import Authenticator
from gateway.errors import NotFound
from gateway.maintenance import Maintenance
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.sessions import Sessions
from gateway.settings import Settings
from gateway.stored_completions import StoredCompletions
from gateway.upstream import Upstream
from storage import accounts
from storage.accounts import KeyGrant
from storage.batch import insert_ignore
from storage.database import create_engine, ensure_database, migrate, ping
from storage.dsn import parse_dsn
from storage.partitions import Partitions
from storage.schema import api_keys
from storage.spool import Spool
from storage.writer import adopt
from storage.writer_process import WriterConfig, WriterProcess

log = logging.getLogger("mes.app")


class FromState:
    """An ASGI endpoint that calls the lifespan-state object named ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await scope["state"][self.name](scope, receive, send)


async def _http_error(request: Request, error: Exception) -> Response:
    """What Starlette itself refuses (a path no route can match, a method not allowed), in
    OpenAI's error shape like every other error of the gateway."""
    assert isinstance(error, HTTPException)
    body = {
        "error": {
            "message": f"{error.detail}: {request.method} {request.url.path}",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found" if error.status_code == 404 else None,
        }
    }
    return _json(body, status=error.status_code)


def _stored(name: str) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that calls method ``name`` of the lifespan's ``StoredCompletions``."""

    async def endpoint(request: Request) -> Response:
        handler: Callable[[Request], Awaitable[Response]] = getattr(request.state.stored, name)
        return await handler(request)

    return endpoint


class NotFoundEndpoint:
    """Every path the gateway does not serve: 404 in OpenAI's error shape."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_error(send, NotFound(f"Unknown route {scope['method']} {scope['path']}."))


async def _to_viewer(request: Request) -> Response:
    """``/ui``, as the README writes it, is the viewer's home page ``/ui/``."""
    return RedirectResponse("/ui/", status_code=307)


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    engines: dict[str, AsyncEngine] = request.state.engines
    writer: WriterProcess = request.state.writer
    databases = {}
    for name, engine in engines.items():
        try:
            await asyncio.wait_for(ping(engine), timeout=2.0)
            databases[name] = "ok"
        except Exception as error:  # any failure means "not ready"; the reason is reported
            databases[name] = f"unreachable: {type(error).__name__}"
    stalled = writer.stalled_seconds
    settings: Settings = request.state.settings
    ready = all(state == "ok" for state in databases.values())
    ready = ready and stalled <= settings.stall_seconds
    body = {
        "status": "ready" if ready else "not ready",
        "databases": databases,
        "queue_depth": writer.depth,
        "spool_bytes": writer.spool.pending_bytes,
        "writer_stalled_seconds": round(stalled, 1),
    }
    return _json(body, status=200 if ready else 503)


async def metrics(request: Request) -> Response:
    registry: Metrics = request.state.metrics
    return PlainTextResponse(registry.render(), media_type="text/plain; version=0.0.4")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def _until_done(step: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``step`` (create and migrate a database) until it succeeds, backing off."""
    delay = 0.5
    while True:
        try:
            await step()
            return
        except Exception as error:  # down, unreachable or refusing: log, wait, try again
            log.warning(
                "%s database not ready (%s: %s): retrying", name, type(error).__name__, error
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _first_try(done: asyncio.Task[None] | asyncio.Event, seconds: float = 15.0) -> None:
    """Give a database setup the time a healthy database needs, and no more: the gateway
    starts serving either way."""
    waiter = done.wait() if isinstance(done, asyncio.Event) else asyncio.shield(done)
    try:
        await asyncio.wait_for(waiter, seconds)
    except TimeoutError:
        log.warning("a database is not ready yet: serving, and spooling history meanwhile")


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


class Gateway:
    """The ASGI app. The captured APIs' calls (``POST /v1/chat/completions`` and the like),
    the hot path, go straight to the proxy (itself pure ASGI, answering its own errors);
    everything else through Starlette's router, whose matching costs the hot path
    measurably (``bench/speed.py``, capture off)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in ROUTES:
            await scope["state"]["proxy"](scope, receive, send)
        else:
            await self.app(scope, receive, send)


class OnFirstUse:
    """An ASGI app made when its first request comes. The admin API and the viewer need
    FastAPI, pydantic and Jinja2: ~18 MiB of a gateway's memory and ~0.7 s of its start,
    which a gateway nobody administers does without. Their modules are imported in a thread
    (the event loop serves requests meanwhile), then moved out of the garbage collector's
    reach like everything made at start."""

    def __init__(self, module: str, factory: str) -> None:
        self.module = module
        self.factory = factory
        self._app: Any = None
        self._lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            async with self._lock:  # made once, whoever asks first
                if self._app is None:
                    module = await asyncio.to_thread(importlib.import_module, self.module)
                    self._app = getattr(module, self.factory)()
                    gc.freeze()
        await self._app(scope, receive, send)


def _not_captured(record: object) -> bool:
    """``MES_CAPTURE=false``: the gateway proxies and records nothing."""
    return False


def writer_config(settings: Settings) -> WriterConfig:
    return WriterConfig(
        history_dsn=settings.history_dsn,
        pool_size=settings.db_pool_size,
        daily_partition=settings.mes_daily_partition,
        spool_dir=settings.spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
        batch_size=settings.capture_batch_size,
        flush_interval=settings.capture_flush_interval,
        retry_seconds=settings.capture_retry_seconds,
        redact_patterns=settings.redact_patterns,
        capture_content=settings.capture_content,
        shutdown_grace=settings.shutdown_grace_seconds,
        log_level=settings.log_level,
    )


def create_app(settings: Settings | None = None) -> Gateway:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        main_engine = create_engine(parse_dsn(settings.main_dsn), settings.db_pool_size)
        history_engine = main_engine
        if settings.history_dsn != settings.main_dsn:
            history_engine = create_engine(parse_dsn(settings.history_dsn), settings.db_pool_size)

        async def lookup(digest: str) -> KeyGrant | None:
            async with main_engine.connect() as connection:
                return await accounts.key_grant(connection, digest)

        authenticator = Authenticator(settings.gateway_keys, settings.managed_mode, lookup)

        async def prepare_main() -> None:
            await ensure_database(settings.main_dsn)
            await migrate(main_engine, "main")
            await _register_gateway_keys(main_engine, authenticator.fingerprints)

        partitions = Partitions(history_engine) if settings.mes_daily_partition else None

        registry = Metrics()
        spool = Spool(Path(settings.spool_dir), settings.spool_max_bytes)
        spool.open()
        writer = WriterProcess(writer_config(settings), spool, registry)
        registry.shared = writer.counters
        writer.start()  # its imports overlap the main database's setup
        registry.gauges["queue_depth"] = lambda: writer.depth
        registry.gauges["spool_bytes"] = lambda: spool.pending_bytes
        registry.gauges["writer_stalled_seconds"] = lambda: writer.stalled_seconds
        # A database that is down at start does not stop the gateway: requests are served
        # and spooled, and the databases are set up as soon as they answer.
        background = [asyncio.create_task(_until_done(prepare_main, "main"))]
        await _first_try(background[0])
        await _first_try(writer.ready_event)
        for orphan in spool.orphans():
            background.append(asyncio.create_task(adopt(orphan, spool, registry, writer.appended)))
        maintenance = Maintenance(settings, history_engine, main_engine, registry, partitions)
        main_ready = background[0]

        async def databases_ready() -> None:
            await writer.ready_event.wait()
            await asyncio.shield(main_ready)

        maintenance.start(databases_ready)
        upstream = Upstream(settings)
        proxy = Proxy(
            settings,
            upstream,
            authenticator,
            writer.submit if settings.capture else _not_captured,
            registry,
        )
        stored = StoredCompletions(history_engine, main_engine, authenticator)
        engines = {"main": main_engine}
        if history_engine is not main_engine:
            engines["history"] = history_engine
        # Everything made at start (modules, routes, schemas, pools) moves out of the cyclic
        # garbage collector's reach: its full collections had to walk it all, stalling
        # every request in flight (bench: p99 at concurrency 16, capture off, 84 -> 4 ms;
        # at concurrency 1, 29 -> 0.7 ms; and ~30 % more requests/s).
        gc.collect()
        gc.freeze()
        log.info(
            "MES Gateway ready: upstream %s, %s mode",
            settings.upstream_base_url,
            "managed" if settings.managed_mode else "pass-through",
        )
        try:
            yield {
                "settings": settings,
                "proxy": proxy,
                "stored": stored,
                "authenticator": authenticator,
                "writer": writer,
                "metrics": registry,
                "engines": engines,
                "history_engine": history_engine,
                "maintenance": maintenance,
                "ui_sessions": Sessions(settings),
            }
        finally:
            for task in background:
                task.cancel()
            await maintenance.close()
            await writer.close(settings.shutdown_grace_seconds)
            await upstream.close()
            for engine in engines.values():
                await engine.dispose()

    return Gateway(
        Starlette(
            routes=[
                # OpenAI's stored-completions API is served here; POST /v1/chat/completions and
                # every other /v1 route go to the proxy.
                Route("/v1/chat/completions", _stored("list"), methods=["GET"]),
                Route("/v1/chat/completions/{completion_id}", _stored("retrieve"), methods=["GET"]),
                Route("/v1/chat/completions/{completion_id}", _stored("update"), methods=["POST"]),
                Route(
                    "/v1/chat/completions/{completion_id}", _stored("delete"), methods=["DELETE"]
                ),
                Route(
                    "/v1/chat/completions/{completion_id}/messages",
                    _stored("messages"),
                    methods=["GET"],
                ),
                Route("/v1/{path:path}", FromState("proxy")),
                Mount("/admin", OnFirstUse("gateway.admin", "create_admin_app")),
                Route("/ui", _to_viewer),
                Mount("/ui", OnFirstUse("gateway.ui", "create_ui")),
                Route("/healthz", healthz),
                Route("/readyz", readyz),
                Route("/metrics", metrics),
                Route("/{path:path}", NotFoundEndpoint()),
            ],
            lifespan=lifespan,
            exception_handlers={HTTPException: _http_error},
        )
    )
