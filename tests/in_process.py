"""The fast tier's gateway: the app in this process, reached through httpx's ASGI transport,
with the fake upstream standing behind the upstream interface (no socket either side) and
history in SQLite in a temporary folder. Its writer is the real one, a child process
following the spool, as in production.

httpx's ASGI transport hands over whole bodies: these tests check what is sent and stored,
not when; streaming as it happens, disconnects and outages are the slow tier's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from fake_upstream.app import FakeUpstream
from gateway.app import create_app
from gateway.asgi import Headers, Message, Receive, Scope, Send
from gateway.errors import UpstreamUnreachable
from gateway.services import Services, running
from gateway.settings import Settings
from gateway.upstream import Transport, UpstreamBroke
from tests.history_db import HistoryDB

ADMIN_KEY = "admin-in-process"
UPSTREAM_KEY = "sk-upstream-in-process"


class InProcessResponse:
    """An answer of the in-process fake upstream, as the pool's answers are read."""

    def __init__(self, status: int, headers: Headers, task: asyncio.Task[None]) -> None:
        self.status = status
        self.headers = headers
        self.body: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._task = task

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            piece = await self.body.get()
            if piece is None:
                return
            if isinstance(piece, BaseException):
                raise UpstreamBroke(type(piece).__name__, timed_out=False)
            if piece:
                yield piece

    def close(self) -> None:
        if not self._task.done():
            self._task.cancel()  # the gateway left: the fake stops generating


class InProcessTransport:
    """The fake upstream as the gateway's ``Transport``."""

    def __init__(self, app: FakeUpstream) -> None:
        self.app = app

    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> InProcessResponse:
        parts = urlsplit(url)
        scope: Scope = {
            "type": "http",
            "method": method,
            "path": unquote(parts.path),
            "raw_path": parts.path.encode(),
            "query_string": parts.query.encode(),
            "headers": [(name.lower(), value) for name, value in headers],
        }
        head: asyncio.Future[InProcessResponse] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()
        sent_body = False
        answer: InProcessResponse | None = None

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal answer
            if message["type"] == "http.response.start":
                answer = InProcessResponse(message["status"], list(message["headers"]), task)
                head.set_result(answer)
            elif answer is not None:
                answer.body.put_nowait(message.get("body", b""))
                if not message.get("more_body", False):
                    answer.body.put_nowait(None)
                    done.set()

        def ended(finished: asyncio.Task[None]) -> None:
            error = None if finished.cancelled() else finished.exception()
            if error is None:
                return
            if not head.done():
                head.set_exception(UpstreamUnreachable("The upstream could not be reached."))
            elif answer is not None:
                answer.body.put_nowait(error)

        task = asyncio.get_running_loop().create_task(self.app(scope, receive, send))
        task.add_done_callback(ended)
        return await head

    async def close(self) -> None:
        pass


@dataclass
class Gateway:
    client: httpx.AsyncClient
    services: Services
    fake: FakeUpstream
    history: HistoryDB

    def as_user(self, key: str) -> httpx.AsyncClient:
        """A client of the same app that presents ``key``."""
        return httpx.AsyncClient(
            transport=self.client._transport,
            base_url=self.client.base_url,
            headers={"Authorization": f"Bearer {key}"},
        )

    async def signed_in(self, key: str) -> httpx.AsyncClient:
        """A browser of the viewer, signed in with ``key`` (the admin key or a user's)."""
        signed = await self.client.post("/ui/login", data={"key": key, "next": "/ui/"})
        assert signed.status_code == 303, signed.text
        return httpx.AsyncClient(
            transport=self.client._transport, base_url=self.client.base_url, cookies=signed.cookies
        )

    async def written(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the writer has written ``count`` records in all."""
        deadline = time.monotonic() + timeout
        while (done := self.services.writer.counters()["records_written"]) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{done} of {count} records written in {timeout} s")
            await asyncio.sleep(0.02)

    async def settled(self, timeout: float = 60.0) -> None:
        """Wait until every record spooled so far is written (or otherwise done with)."""
        deadline = time.monotonic() + timeout
        while (waiting := self.services.writer.depth) > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{waiting} records still unwritten after {timeout} s")
            await asyncio.sleep(0.02)

    async def new_user(self, name: str) -> tuple[str, str]:
        """A user made through the admin API, and a key issued to them: (user id, key)."""
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        user = await self.client.post("/admin/users", json={"name": name}, headers=admin)
        assert user.status_code == 201, user.text
        user_id = user.json()["id"]
        key = await self.client.post(f"/admin/users/{user_id}/keys", json={}, headers=admin)
        assert key.status_code == 201, key.text
        return user_id, key.json()["key"]


class Hosts:
    """Several fake upstreams, each the upstream of its host (``http://HOST/v1``); a host
    with none refuses the connection."""

    def __init__(self, fakes: dict[str, FakeUpstream]) -> None:
        self.transports = {host: InProcessTransport(fake) for host, fake in fakes.items()}

    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> InProcessResponse:
        found = self.transports.get(urlsplit(url).netloc)
        if found is None:
            raise UpstreamUnreachable("The upstream could not be reached.")
        return await found.send(method, url, headers, body)

    async def close(self) -> None:
        pass


@asynccontextmanager
async def gateway(
    folder: Path,
    managed: bool = True,
    env: dict[str, str] | None = None,
    fakes: dict[str, FakeUpstream] | None = None,
    **settings: Any,
) -> AsyncIterator[Gateway]:
    """A gateway in this process, history in ``folder``; managed mode (keys issued through
    the admin API) unless ``managed`` is False. ``env`` is read as the environment would be
    (``UPSTREAMS`` and each one's variables, say), and ``fakes`` are the upstreams of their
    hosts; otherwise one fake answers everything."""
    configured = replace(
        Settings.from_env({"GATEWAY_ADMIN_KEY": ADMIN_KEY, **(env or {})}),
        sqlite_path=str(folder / "history.db"),
        spool_dir=str(folder / "spool"),
        capture_flush_interval=0.01,
        gateway_admin_key=ADMIN_KEY,
        upstream_api_key=UPSTREAM_KEY if managed else None,
        **settings,
    )
    fake = next(iter(fakes.values())) if fakes else FakeUpstream()
    transport: Transport = Hosts(fakes) if fakes else InProcessTransport(fake)
    app = create_app(configured, transport)
    async with running(configured, transport) as started:

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope["state"] = {"services": started}  # what uvicorn gives from the lifespan
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state, client=("198.51.100.7", 50000))
        history = HistoryDB(configured.history_dsn)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway.test", timeout=60
        ) as client:
            try:
                yield Gateway(client, started, fake, history)
            finally:
                await history.close()
