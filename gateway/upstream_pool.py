"""The gateway's connection pool to the upstream (its ``Transport``, ``gateway/upstream.py``):
HTTP/1.1 keep-alive connections on the event loop's own transports, answers parsed by
httptools (llhttp, in C; uvicorn parses requests with it too). It was chosen by measurement
over httpx's pool (encode/httpx#3215) and aiohttp's client: the figures are in the README's
Performance section.

The pool forwards what the gateway gives it and adds only ``Host`` and ``Content-Length``:
no ``User-Agent``, ``Accept`` or ``Accept-Encoding`` of its own, and no cookies (an
upstream's ``Set-Cookie`` is relayed to its client, never kept and replayed for the next
caller). Bodies come back as the upstream sent them (chunked transfer decoded, never
decompressed). ``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY`` are honoured: plain HTTP
through the proxy, HTTPS through a ``CONNECT`` tunnel; an ``https://`` proxy is spoken to
over TLS. A request is never retried: a chat completion sent twice may be paid twice.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import aiohappyeyeballs
import httptools

from gateway.asgi import Headers
from gateway.errors import UpstreamTimeout, UpstreamUnreachable
from gateway.upstream import UpstreamBroke

log = logging.getLogger("mes.upstream")

# Idle connections are let go before the usual server-side idle timeouts (uvicorn's and
# Node's 5 s): reusing one the upstream is closing at that instant fails the request.
KEEPALIVE_SECONDS = 4.0
# An answer's body buffered past this, unread, pauses reading from the upstream.
BUFFER_BYTES = 2**20
# An answer whose head (status line and headers) is still not whole after this many bytes
# is refused: a broken upstream's endless header cannot fill the gateway's memory.
HEAD_BYTES = 64 * 2**10
# Headers the pool writes itself, or that cannot be forwarded on a connection of its own
# (the gateway has the whole body already: it expects no 100 Continue).
_OWN = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE"})
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


class _Origin:
    """Where requests for one scheme://host:port go, and how."""

    __slots__ = (
        "key",
        "host",
        "port",
        "tls",
        "host_header",
        "proxy",
        "proxy_tls",
        "proxy_auth",
        "absolute",
    )

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = f"{parts.scheme}://{parts.netloc}"
        self.host_header = parts.netloc.rsplit("@", 1)[-1].encode("idna")
        self.proxy: tuple[str, int] | None = None
        self.proxy_tls = False  # an https:// proxy: TLS to the proxy itself
        self.proxy_auth: bytes | None = None
        proxy_url = _proxy_for(parts.scheme, self.host)
        if proxy_url:
            proxy = urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
            if proxy.scheme not in ("http", "https") or not proxy.hostname:
                raise ValueError(f"not an http(s) proxy: {proxy_url!r}")
            self.proxy_tls = proxy.scheme == "https"
            self.proxy = (proxy.hostname, proxy.port or (443 if self.proxy_tls else 80))
            if proxy.username is not None:
                secret = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
                self.proxy_auth = b"Basic " + base64.b64encode(secret.encode())
        # Plain HTTP through a proxy names the whole URL; HTTPS tunnels, and names the path.
        self.absolute = self.proxy is not None and not self.tls


def _proxy_for(scheme: str, host: str) -> str | None:
    proxies = urllib.request.getproxies_environment()
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not proxies or bypass(host, proxies):
        return None
    return proxies.get(scheme) or proxies.get("all")


class _Connection(asyncio.Protocol):
    """One connection to the upstream and the answer being read on it."""

    def __init__(self, pool: UpstreamPool, origin: _Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.counted = False  # among the pool's open connections
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[bool] | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self.status = 0
        self.headers: Headers = []
        self.chunks: deque[bytes] = deque()
        self._buffered = 0
        self._head_bytes = 0  # bytes read of an answer whose head is not whole yet
        self._paused = False
        self._head_only = False
        self._length_known = False
        self.complete = False
        self.reusable = False
        self.error: str | None = None

    # -- asyncio --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # bytes nobody asked for: the connection cannot be trusted
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._break(f"invalid answer: {error}")
            if self.transport is not None:
                self.transport.close()
            return
        if not self.status and not self.complete:  # the head is not whole yet
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_BYTES:
                self._break(f"the answer's head is over {HEAD_BYTES} bytes")
                if self.transport is not None:
                    self.transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        if self._parser is not None and not self.complete:
            if self._head is None and not self._length_known and not self._head_only:
                self._finish()  # a body delimited by the connection's end
            else:
                self._break(type(exc).__name__ if exc else "ServerDisconnected")
        self.pool._forget(self)

    # -- httptools ------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:  # bytes past the end of the answer
            self.close()
        elif not self.status:  # after the head, a chunked body's trailers: not relayed
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete or self._parser is None:
            return
        status = self._parser.get_status_code()
        if status < 200:  # an informational answer (103 Early Hints): the real one follows
            self.headers = []
            return
        self.status = status
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._length_known = True
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(True)
        if self._head_only:  # HEAD's answer has no body, whatever its headers say
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self._buffered += len(body)
        if self._buffered > BUFFER_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0 or self.complete or self._parser is None:
            return  # an informational answer, or HEAD's
        self.reusable = self._parser.should_keep_alive() and not self.lost
        self._finish()

    # -- the gateway's side ---------------------------------------------------------------

    def send(self, request: bytes, head_only: bool) -> asyncio.Future[bool]:
        """Write a request; the future is done when the answer's head has arrived."""
        assert self.transport is not None
        if self.lost or self.transport.is_closing():
            raise ConnectionError("the connection closed before the request was written")
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers = []
        self.chunks.clear()
        self._buffered = 0
        self._head_bytes = 0
        self._head_only = head_only
        self._length_known = False
        self.complete = self.reusable = False
        self.error = None
        self._head = self.pool.loop.create_future()
        self.transport.write(request)
        return self._head

    def take(self) -> bytes:
        """The body bytes that have arrived and not been taken."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()
        return data

    def sent_whole(self) -> bool:
        """The request went out whole (an upstream may answer before reading all of it)."""
        return self.transport is not None and self.transport.get_write_buffer_size() == 0

    def more(self) -> asyncio.Future[bool]:
        """A future done when more of the body has arrived, or the body ended or broke."""
        self._waiter = self.pool.loop.create_future()
        return self._waiter

    def close(self) -> None:
        """Drop the connection now: what is left of a request body unsent is not sent (an
        upstream never gets a request its client gave up on), and its place in the pool is
        free at once, not when the upstream has read a buffer nobody wants."""
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()
        self.pool._forget(self)

    def _finish(self) -> None:
        self.complete = True
        self._parser = None  # until the next request: any byte before it closes the connection
        self._wake()

    def _break(self, reason: str) -> None:
        if self.complete:
            return
        self.error = reason
        self.reusable = False
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(ConnectionError(reason))
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(True)


class PooledResponse:
    """An upstream answer whose head has arrived; its body is read with ``chunks()``."""

    __slots__ = ("_connection", "_timeout", "status", "headers")

    def __init__(self, connection: _Connection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self.status = connection.status
        self.headers: Headers = connection.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (after transfer decoding, never decompressed)."""
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.take()
            elif connection.complete:
                return
            elif connection.error is not None:
                raise UpstreamBroke(connection.error, timed_out=False)
            elif not await _within(connection.more(), self._timeout):
                raise UpstreamBroke("ReadTimeout", timed_out=True)

    def close(self) -> None:
        """Give the connection back if the answer was read to its end; otherwise close it,
        so that an upstream still generating a stream nobody reads stops."""
        connection = self._connection
        read = connection.complete and not connection.chunks
        if read and connection.reusable and connection.sent_whole():
            connection.pool._release(connection)
        else:
            connection.close()


class UpstreamPool:
    """One pool per process, made in the lifespan (it needs the running loop): at most
    ``max_connections`` open, ``connect_timeout`` seconds to open one, ``timeout`` seconds
    for an answer's head and between two pieces of its body."""

    def __init__(self, max_connections: int, connect_timeout: float, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._limit = max_connections
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[str, list[_Connection]] = {}
        self._open = 0  # connections open or being opened
        self._waiting: deque[asyncio.Future[bool]] = deque()
        self._tls: ssl.SSLContext | None = None

    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> PooledResponse:
        """Send a request; the answer's head is back when this returns."""
        try:
            origin, target = self._origin(url)
        except ValueError as error:
            log.warning("upstream unreachable: %s", error)
            raise UpstreamUnreachable("The upstream could not be reached.") from None
        request = _request_bytes(method, target, origin, headers, body)
        deadline = self.loop.time() + self._timeout  # for a free connection
        for attempt in (1, 2):
            connection = await self._acquire(origin, deadline)
            reused = connection.idle_since > 0
            try:
                head = connection.send(request, head_only=method == "HEAD")
                if not await _within(head, self._timeout):
                    raise UpstreamTimeout("The upstream did not answer in time.")
            except ConnectionError as error:
                connection.close()
                # An idle connection the upstream closed as it was reused: a request that
                # may be sent twice is, once, on a new connection (never a POST).
                if attempt == 1 and reused and method in _IDEMPOTENT:
                    continue
                log.warning("upstream unreachable: %s", error)
                raise UpstreamUnreachable("The upstream could not be reached.") from None
            except BaseException:
                connection.close()
                raise
            return PooledResponse(connection, self._timeout)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for idle in list(self._idle.values()):
            for connection in list(idle):
                connection.close()
        self._idle.clear()

    # -- the pool -------------------------------------------------------------------------

    def _origin(self, url: str) -> tuple[_Origin, bytes]:
        """The origin of ``url`` and the request target to write (its path and query)."""
        split = url.find("/", url.find("//") + 2) if "//" in url else -1
        prefix, path = (url, "/") if split < 0 else (url[:split], url[split:])
        origin = self._origins.get(prefix)
        if origin is None:
            origin = self._origins[prefix] = _Origin(prefix)
        target = url if origin.absolute else path
        return origin, target.encode("latin-1")

    async def _acquire(self, origin: _Origin, deadline: float) -> _Connection:
        """An idle connection to ``origin``, or a new one; at the limit, the first to be
        let go (waiting at most until ``deadline``)."""
        while True:
            idle = self._idle.get(origin.key)
            now = self.loop.time()
            while idle:
                connection = idle.pop()
                if (
                    not connection.lost
                    and connection.transport is not None
                    and not connection.transport.is_closing()
                    and now - connection.idle_since < KEEPALIVE_SECONDS
                ):
                    return connection
                connection.close()
            if self._open < self._limit:
                break
            waiter: asyncio.Future[bool] = self.loop.create_future()
            self._waiting.append(waiter)
            try:
                woken = await _within(waiter, deadline - now)
            except BaseException:  # cancelled: a wake-up this waiter got goes to the next
                if waiter.done() and not waiter.cancelled() and waiter.result():
                    self._wake_one()
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
            if not woken:
                raise UpstreamTimeout("The upstream did not answer in time.")
        self._open += 1
        try:
            connection = await self._connect(origin)
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        connection.counted = True
        return connection

    async def _connect(self, origin: _Origin) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                if origin.proxy is None:
                    connection = await self._dial(origin, origin.host, origin.port, origin.tls)
                elif not origin.tls:  # plain HTTP, through the proxy
                    connection = await self._dial(origin, *origin.proxy, origin.proxy_tls)
                else:
                    connection = await self._tunnel(origin)
        except TimeoutError:
            raise UpstreamTimeout("The upstream did not answer in time.") from None
        except (OSError, EOFError, ValueError) as error:  # refused, reset, bad TLS, tunnel
            log.warning("upstream unreachable: %s", type(error).__name__)
            raise UpstreamUnreachable("The upstream could not be reached.") from None
        return connection

    async def _dial(self, origin: _Origin, host: str, port: int, tls: bool) -> _Connection:
        """A connection to ``host``, over TLS (checked against ``host``'s name) or not."""
        _, connection = await self.loop.create_connection(
            lambda: _Connection(self, origin),
            sock=await self._socket(host, port),
            ssl=self._tls_context() if tls else None,
            server_hostname=host if tls else None,
        )
        return connection

    async def _tunnel(self, origin: _Origin) -> _Connection:
        """HTTPS through a proxy: CONNECT, then TLS to the upstream inside the tunnel (TLS
        inside TLS, through an https:// proxy)."""
        assert origin.proxy is not None
        connection = await self._dial(origin, *origin.proxy, origin.proxy_tls)
        try:
            named = f"[{origin.host}]" if ":" in origin.host else origin.host
            authority = f"{named}:{origin.port}".encode("idna")
            lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority]
            if origin.proxy_auth:
                lines.append(b"Proxy-Authorization: " + origin.proxy_auth)
            await connection.send(b"\r\n".join(lines) + b"\r\n\r\n", head_only=True)
            if connection.status != 200:
                raise ConnectionError(f"the proxy refused the tunnel: {connection.status}")
            assert connection.transport is not None
            transport = await self.loop.start_tls(
                connection.transport, connection, self._tls_context(), server_hostname=origin.host
            )
        except BaseException:
            connection.close()
            raise
        assert transport is not None
        connection.transport = transport
        return connection

    async def _socket(self, host: str, port: int) -> socket.socket:
        """A connected socket: the host's addresses tried as RFC 8305 says (an IPv6 route
        that drops packets costs 250 ms, not the whole connect timeout)."""
        addresses = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return await aiohappyeyeballs.start_connection(addresses, happy_eyeballs_delay=0.25)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _release(self, connection: _Connection) -> None:
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.origin.key, []).append(connection)
        self._wake_one()

    def _forget(self, connection: _Connection) -> None:
        """A connection closed: one fewer open."""
        if not connection.counted:
            return  # lost while being opened: counted off by _acquire
        connection.counted = False
        self._open -= 1
        idle = self._idle.get(connection.origin.key)
        if idle and connection in idle:
            idle.remove(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return


def _request_bytes(
    method: str, target: bytes, origin: _Origin, headers: Headers, body: bytes
) -> bytes:
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1", b"Host: " + origin.host_header]
    lines += [name + b": " + value for name, value in headers if name.lower() not in _OWN]
    if body or method not in _BODILESS:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    if origin.absolute and origin.proxy_auth:
        lines.append(b"Proxy-Authorization: " + origin.proxy_auth)
    lines.append(b"\r\n")
    return b"\r\n".join(lines) + body


async def _within(future: asyncio.Future[bool], seconds: float) -> bool:
    """Wait for ``future`` at most ``seconds``: True when it was woken, False when the time
    ran out first."""
    if future.done():
        return future.result()
    if seconds <= 0:
        return False
    timer = future.get_loop().call_later(seconds, _expire, future)
    try:
        return await future
    finally:
        timer.cancel()


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)
