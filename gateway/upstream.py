"""The upstream, behind a small interface: ``send`` a request, then read the answer's
``status``, ``headers`` and ``chunks()``, and ``close()`` it.

An ``Upstream`` is one place requests go: its base URL, the key the gateway uses there in
managed mode, and the ``Transport`` that carries the bytes (the gateway's own keep-alive
pool, ``gateway/upstream_pool.py``; a test's fake), and, when there are several
(``UPSTREAMS``), its name, the format it speaks, the models it serves and the upstreams that
stand in for it. ``gateway/routing.py`` picks them for each request.
"""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from gateway.asgi import Headers


class UpstreamBroke(Exception):
    """The upstream's answer stopped before its end: the connection broke or went quiet for
    longer than ``UPSTREAM_TIMEOUT``."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class UpstreamResponse(Protocol):
    """An answer whose head has arrived."""

    status: int
    headers: Headers

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (never decompressed); ``UpstreamBroke`` if the
        answer stops before its end."""
        ...

    def close(self) -> None:
        """Done with the answer: read to its end or not (then the request is abandoned)."""
        ...


class Transport(Protocol):
    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> UpstreamResponse:
        """Send a request; return once the answer's head is back. ``UpstreamUnreachable``
        or ``UpstreamTimeout`` when there is no answer."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Upstream:
    """One upstream: where ``/v1`` requests go and with which key."""

    base_url: str  # ends with the API's version, as clients name it: https://host/v1
    api_key: str | None = field(repr=False)  # set: managed mode, this key goes upstream
    transport: Transport = field(repr=False)
    name: str = "default"
    format: str = "openai"  # or "anthropic": /v1/messages, its key in x-api-key
    models: tuple[str, ...] = ("*",)  # glob patterns
    fallbacks: tuple[str, ...] = ()  # names, tried in order when this one fails

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    @cached_property
    def credentials(self) -> tuple[bytes, bytes] | None:
        """The header that carries the gateway's own key upstream, in managed mode."""
        if self.api_key is None:
            return None
        if self.format == "anthropic":
            return (b"x-api-key", self.api_key.encode())
        return (b"authorization", b"Bearer " + self.api_key.encode())

    def url(self, raw_path: bytes, query: bytes) -> str:
        """The upstream URL of a client's ``/v1/...`` path and query."""
        rest = raw_path.decode("latin-1").removeprefix("/v1")
        if not rest.startswith("/"):  # "/v1%2F@elsewhere/": still a path on the upstream
            rest = "/" + rest
        url = self.base_url + rest
        return url + "?" + query.decode("latin-1") if query else url

    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> UpstreamResponse:
        return await self.transport.send(method, url, headers, body)

    async def close(self) -> None:
        await self.transport.close()


def content_type(response: UpstreamResponse) -> str:
    for name, value in response.headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return ""


def is_success(response: UpstreamResponse) -> bool:
    return 200 <= response.status < 300
