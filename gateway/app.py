"""``create_app(settings)`` assembles the gateway: the routes of each surface (``/v1``,
``/admin``, ``/ui``, health and metrics), their error handlers, and the lifespan, which makes
every long-lived object once (``gateway/services.py``) and hands them to requests as one
typed ``Services``. Nothing is done on import."""

from __future__ import annotations

import asyncio
import gc
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from capture.registry import ROUTES
from gateway.asgi import Receive, Scope, Send
from gateway.errors import (
    DATABASE_TROUBLE,
    GatewayError,
    NotFound,
    history_unavailable,
    json_error,
)
from gateway.logs import RequestIds
from gateway.services import REPLICA, Services, running, services
from gateway.settings import Settings
from gateway.stored_completions import StoredCompletions
from gateway.upstream import Transport
from storage.database import ping


class ProxyEndpoint:
    """``/v1``: the proxy, pure ASGI, answering its own errors."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxied: Services = scope["state"]["services"]
        await proxied.proxy(scope, receive, send)


def _stored(
    method: Callable[[StoredCompletions, Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that calls ``method`` of the app's ``StoredCompletions``."""

    async def endpoint(request: Request) -> Response:
        try:
            return await method(services(request).stored, request)
        except DATABASE_TROUBLE as error:
            found = history_unavailable(error)
            if found is None:
                raise
            raise found from error

    return endpoint


class UnknownRoute:
    """Every path the gateway does not serve, whatever the method (an ASGI endpoint takes
    them all): 404, which tells a client whose base URL lacks ``/v1`` what is wrong."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotFound(f"Unknown route {scope['method']} {scope['path']}.")


async def _to_viewer(request: Request) -> Response:
    """``/ui``, as the README writes it, is the viewer's home page ``/ui/``."""
    return RedirectResponse("/ui/", status_code=307)


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    served = services(request)
    databases = {}
    for name, engine in served.engines.items():
        try:
            await asyncio.wait_for(ping(engine), timeout=2.0)
            databases[name] = "ok"
        except Exception as error:  # any failure means "not ready"; the reason is reported
            databases[name] = f"unreachable: {type(error).__name__}"
    stalled = served.writer.stalled_seconds
    # A read replica's trouble is reported, and fails the read APIs meanwhile; requests and
    # their capture do not need it, so it does not take the gateway out of rotation.
    needed = [state for name, state in databases.items() if name != REPLICA]
    ready = all(state == "ok" for state in needed) and served.set_up
    ready = ready and stalled <= served.settings.stall_seconds
    body = {
        "status": "ready" if ready else "not ready",
        "databases": databases,
        "set_up": served.set_up,  # created and migrated (or checked), both of them
        "queue_depth": served.writer.depth,
        "spool_bytes": served.writer.spool.pending_bytes,
        "writer_stalled_seconds": round(stalled, 1),
    }
    if served.settings.queue_url:  # records wait in the spool while it is unreachable
        body["queue"] = "ok" if served.writer.queue_reachable else "unreachable"
    if served.maintenance.archive is not None:
        # Retention waits while its archive cannot be written; requests and capture do not.
        failing = served.maintenance.archive_failing
        body["archive"] = (
            "ok"
            if failing is None
            else {"status": "failing", "since": failing[0].isoformat(), "error": failing[1]}
        )
    return _json(body, status=200 if ready else 503)


async def metrics(request: Request) -> Response:
    text = services(request).metrics.render()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class Gateway:
    """The ASGI app. The captured APIs' calls (``POST /v1/chat/completions`` and the like),
    the hot path, go straight to the proxy; everything else through Starlette's router,
    whose matching costs the hot path measurably (``bench/speed.py``, capture off)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in ROUTES:
            await scope["state"]["services"].proxy(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class OnFirstUse:
    """An ASGI app made when its first request comes. The admin API and the viewer need
    FastAPI, pydantic and Jinja2, a good part of a gateway's memory and start-up, which a
    gateway nobody administers does without. Their modules are imported in a thread (the
    event loop serves requests meanwhile), then moved out of the garbage collector's reach
    like everything made at start."""

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


def create_app(
    settings: Settings | None = None, transport: Transport | None = None
) -> Gateway | RequestIds:
    """The gateway, configured by ``settings`` (read from the environment when not given);
    ``transport`` carries its requests upstream instead of its own pool (a test's fake).
    With ``LOG_FORMAT=json``, each request has an id (``gateway/logs.py``)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        async with running(settings, transport) as started:
            yield {"services": started}

    gateway = Gateway(
        Starlette(
            routes=[
                # OpenAI's stored-completions API is served here; POST /v1/chat/completions and
                # every other /v1 route go to the proxy.
                Route("/v1/chat/completions", _stored(StoredCompletions.list), methods=["GET"]),
                Route(
                    "/v1/chat/completions/{completion_id}",
                    _stored(StoredCompletions.retrieve),
                    methods=["GET"],
                ),
                Route(
                    "/v1/chat/completions/{completion_id}",
                    _stored(StoredCompletions.update),
                    methods=["POST"],
                ),
                Route(
                    "/v1/chat/completions/{completion_id}",
                    _stored(StoredCompletions.delete),
                    methods=["DELETE"],
                ),
                Route(
                    "/v1/chat/completions/{completion_id}/messages",
                    _stored(StoredCompletions.messages),
                    methods=["GET"],
                ),
                Route("/v1/{path:path}", ProxyEndpoint()),
                Mount("/admin", OnFirstUse("gateway.admin", "create_admin_app")),
                Mount("/me", OnFirstUse("gateway.own_history", "create_own_app")),
                Route("/ui", _to_viewer),
                Mount("/ui", OnFirstUse("gateway.ui", "create_ui")),
                Route("/healthz", healthz),
                Route("/readyz", readyz),
                Route("/metrics", metrics),
                Route("/{path:path}", UnknownRoute()),
            ],
            lifespan=lifespan,
            exception_handlers={GatewayError: json_error, HTTPException: json_error},
        )
    )
    return RequestIds(gateway) if settings.log_format == "json" else gateway
