"""The upstream pool against a raw HTTP/1.1 server that answers what each test scripts: what
it writes, how answers end (a length, chunks, the connection's close), informational and
bodiless answers, answers cut short or stalled, the connection limit, and proxies."""

from __future__ import annotations

import asyncio
import functools
import inspect
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
import uvloop

from gateway.errors import UpstreamTimeout, UpstreamUnreachable
from gateway.settings import Settings
from gateway.upstream import Upstream, UpstreamBroke, UpstreamResponse, content_type
from gateway.upstream_pool import UpstreamPool
from tests.gateway_process import free_port


def on_both_loops(scenario: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """The test: ``scenario`` run on asyncio's own loop, and on uvloop, the gateway's (it
    takes the fixtures the scenario names)."""

    @functools.wraps(scenario)
    def test(loop: str, **fixtures: Any) -> None:
        (uvloop.run if loop == "uvloop" else asyncio.run)(scenario(**fixtures))

    named = [inspect.Parameter("loop", inspect.Parameter.KEYWORD_ONLY)]
    named += [
        parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=inspect.Parameter.empty)
        for parameter in inspect.signature(scenario).parameters.values()
    ]
    test.__signature__ = inspect.Signature(named)  # type: ignore[attr-defined]
    marked: Callable[..., None] = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])(test)
    return marked


Respond = Callable[[asyncio.StreamWriter, int], Awaitable[bool]]


@dataclass
class Seen:
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


async def _serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, respond: Respond, seen: Seen
) -> None:
    """Read requests one after another; ``respond`` writes each answer and says whether to
    keep the connection open."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        seen.requests.append(head + await reader.readexactly(length))
        keep = await respond(writer, len(seen.requests))
        await writer.drain()
        if not keep:
            return


@asynccontextmanager
async def raw_server(respond: Respond) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        try:
            await _serve(reader, writer, respond, seen)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", seen


def answer(writer: asyncio.StreamWriter, raw: bytes, keep: bool = True) -> Awaitable[bool]:
    writer.write(raw)

    async def kept() -> bool:
        return keep

    return kept()


@asynccontextmanager
async def pool(**settings: object) -> AsyncIterator[UpstreamPool]:
    configured = replace(Settings(), **settings)  # type: ignore[arg-type]
    upstream = UpstreamPool(
        max_connections=configured.upstream_max_connections,
        connect_timeout=configured.upstream_connect_timeout,
        timeout=configured.upstream_timeout,
    )
    try:
        yield upstream
    finally:
        await upstream.close()


async def body(response: UpstreamResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.chunks()])
    finally:
        response.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@on_both_loops
async def test_a_request_carries_what_the_gateway_gave_it_and_connections_are_reused() -> None:
    async with raw_server(lambda w, n: answer(w, OK)) as (url, seen), pool() as upstream:
        headers = [
            (b"Content-Type", b"application/json"),
            (b"X-Trace", b"one"),
            (b"Expect", b"100-continue"),  # the gateway has the body already
            (b"X-Trace", b"two"),
        ]
        for _ in range(3):
            response = await upstream.send("POST", url + "/v1/chat?x=1", headers, b'{"a":1}')
            assert (response.status, content_type(response)) == (200, "application/json")
            assert await body(response) == b"{}"
        response = await upstream.send("GET", url + "/v1/models", [], b"")
        assert await body(response) == b"{}"
    port = url.rsplit(":", 1)[1]
    assert seen.requests[0] == (
        b"POST /v1/chat?x=1 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:" + port.encode() + b"\r\n"
        b"Content-Type: application/json\r\nX-Trace: one\r\nX-Trace: two\r\n"
        b'Content-Length: 7\r\n\r\n{"a":1}'
    )
    assert seen.requests[3] == b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + (
        b"\r\n\r\n"
    )
    assert seen.connections == 1


@on_both_loops
async def test_chunked_and_close_delimited_bodies_arrive_whole() -> None:
    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"6\r\n world\r\n0\r\n\r\n")
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"end")
        return False  # the body ends where the connection does

    async with raw_server(respond) as (url, seen), pool() as upstream:
        first = await upstream.send("GET", url + "/a", [], b"")
        assert (b"Transfer-Encoding", b"chunked") in first.headers
        assert [chunk async for chunk in first.chunks()] == [b"hello", b" world"]
        first.close()
        assert await body(await upstream.send("GET", url + "/b", [], b"")) == b"until the end"
        assert await body(await upstream.send("GET", url + "/c", [], b"")) == b"until the end"
    assert seen.connections == 2  # the second answer closed its connection


@on_both_loops
async def test_bodiless_and_informational_answers() -> None:
    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:  # HEAD: a length, and no body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        elif n == 2:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
        return True

    async with raw_server(respond) as (url, seen), pool() as upstream:
        head = await upstream.send("HEAD", url + "/", [], b"")
        assert (head.status, await body(head)) == (200, b"")
        empty = await upstream.send("DELETE", url + "/", [], b"")
        assert (empty.status, await body(empty)) == (204, b"")
        hinted = await upstream.send("POST", url + "/", [], b"{}")
        assert (hinted.status, await body(hinted)) == (200, b"{}")
        assert all(name != b"Link" for name, _ in hinted.headers)
    assert len(seen.requests) == 3


@on_both_loops
async def test_an_answer_cut_short_or_stalled_breaks_and_its_connection_is_not_reused() -> None:
    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            return False  # closed three bytes in
        if n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await asyncio.sleep(5)  # then nothing for longer than UPSTREAM_TIMEOUT
            return False
        if n == 3:
            await asyncio.sleep(5)  # not even a head
            return False
        writer.write(OK)
        return True

    async with raw_server(respond) as (url, seen), pool(upstream_timeout=0.3) as upstream:
        cut = await upstream.send("GET", url + "/", [], b"")
        with pytest.raises(UpstreamBroke) as broke:
            await body(cut)
        assert not broke.value.timed_out
        stalled = await upstream.send("GET", url + "/", [], b"")
        with pytest.raises(UpstreamBroke) as broke:
            await body(stalled)
        assert broke.value.timed_out
        with pytest.raises(UpstreamTimeout):
            await upstream.send("GET", url + "/", [], b"")
        assert await body(await upstream.send("GET", url + "/", [], b"")) == b"{}"
    assert seen.connections == 4


@on_both_loops
async def test_at_the_connection_limit_a_request_waits_for_a_free_connection() -> None:
    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        await asyncio.sleep(0.1)
        writer.write(OK)
        return True

    async with raw_server(respond) as (url, seen), pool(upstream_max_connections=1) as upstream:

        async def one() -> bytes:
            return await body(await upstream.send("GET", url + "/", [], b""))

        assert await asyncio.gather(*(one() for _ in range(4))) == [b"{}"] * 4
        assert seen.connections == 1
    async with (  # answered at once: the 0.3 s timeout is only the waiting request's
        raw_server(lambda w, n: answer(w, OK)) as (url, seen),
        pool(upstream_max_connections=1, upstream_timeout=0.3) as upstream,
    ):
        held = await upstream.send("GET", url + "/", [], b"")  # its body never read
        with pytest.raises(UpstreamTimeout):
            await upstream.send("GET", url + "/", [], b"")
        held.close()  # not read to its end: closed, and the next request connects anew
        assert await body(await upstream.send("GET", url + "/", [], b"")) == b"{}"
        assert seen.connections == 2


@on_both_loops
async def test_a_connection_the_upstream_closed_while_idle_is_not_reused() -> None:
    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(OK)
        return False  # no Connection: close, but closed anyway (an idle timeout, say)

    async with raw_server(respond) as (url, seen), pool() as upstream:
        for _ in range(3):
            assert await body(await upstream.send("GET", url + "/", [], b"")) == b"{}"
            await asyncio.sleep(0.05)
    assert seen.connections == 3


@on_both_loops
async def test_an_answer_whose_head_never_ends_is_refused_without_waiting_for_it() -> None:
    header = b"X-Padding: " + b"a" * 8_000 + b"\r\n"

    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:  # 60 KB of headers, then a body: a head that is large but whole
            writer.write(b"HTTP/1.1 200 OK\r\n" + header * 7 + b"Content-Length: 2\r\n\r\n{}")
            return True
        writer.write(b"HTTP/1.1 200 OK\r\n" + header * 25)  # 200 KB, and no end in sight
        await writer.drain()
        await asyncio.sleep(10)
        return False

    async with raw_server(respond) as (url, _), pool() as upstream:
        large = await upstream.send("POST", url + "/", [], b"{}")
        assert (large.status, len(large.headers), await body(large)) == (200, 8, b"{}")
        async with asyncio.timeout(5):  # not the upstream timeout: refused past 64 KiB
            with pytest.raises(UpstreamUnreachable):
                await upstream.send("POST", url + "/", [], b"{}")


@on_both_loops
async def test_an_unreachable_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    async with pool(upstream_connect_timeout=2.0) as upstream:
        with pytest.raises(UpstreamUnreachable):
            await upstream.send("GET", f"http://127.0.0.1:{free_port()}/v1/models", [], b"")
        with pytest.raises(UpstreamUnreachable):
            await upstream.send("GET", "ftp://127.0.0.1/v1/models", [], b"")
        monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1080")  # not spoken: refused
        with pytest.raises(UpstreamUnreachable):
            await upstream.send("GET", "http://api.example.test/v1/models", [], b"")


@on_both_loops
async def test_plain_http_goes_through_the_proxy_with_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with raw_server(lambda w, n: answer(w, OK)) as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy.replace("http://", "http://me:p%40ss@"))
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        async with pool() as upstream:
            response = await upstream.send("GET", "http://api.example.test/v1/models", [], b"")
            assert await body(response) == b"{}"
            with pytest.raises(UpstreamUnreachable):  # straight there, not through the proxy
                await upstream.send("GET", f"http://127.0.0.1:{free_port()}/v1/models", [], b"")
    assert seen.requests == [
        b"GET http://api.example.test/v1/models HTTP/1.1\r\nHost: api.example.test\r\n"
        b"Proxy-Authorization: Basic bWU6cEBzcw==\r\n\r\n"
    ]


def trusted_servers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *names: str
) -> list[ssl.SSLContext]:
    """A server's TLS context for each of ``names``, from a CA the pool is made to trust."""
    authority = trustme.CA()
    contexts = []
    for name in names:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert(name).configure_cert(context)
        contexts.append(context)
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    return contexts


@on_both_loops
async def test_https_goes_through_a_connect_tunnel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (server_tls,) = trusted_servers(monkeypatch, tmp_path, "api.example.test")
    seen = Seen()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await writer.start_tls(server_tls)
        try:
            await _serve(reader, writer, lambda w, n: answer(w, OK), seen)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    proxy = await asyncio.start_server(tunnel, "127.0.0.1", 0)
    monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
    async with proxy, pool() as upstream:
        for _ in range(2):
            response = await upstream.send("POST", "https://api.example.test/v1/chat", [], b"{}")
            assert await body(response) == b"{}"
    assert seen.requests[0].startswith(
        b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n"
    )
    assert (
        seen.requests[1:]
        == [b"POST /v1/chat HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 2\r\n\r\n{}"] * 2
    )  # one tunnel, reused


@on_both_loops
async def test_an_https_proxy_is_spoken_to_over_tls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    proxy_tls, upstream_tls = trusted_servers(
        monkeypatch, tmp_path, "localhost", "api.example.test"
    )
    seen = Seen()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # a CONNECT opens a tunnel, with TLS inside this one; else plain HTTP is relayed
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"CONNECT "):
                seen.requests.append(head)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await writer.start_tls(upstream_tls)
                head = await reader.readuntil(b"\r\n\r\n")
            seen.requests.append(head + await reader.readexactly(2))
            writer.write(OK)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0, ssl=proxy_tls)
    address = f"https://localhost:{server.sockets[0].getsockname()[1]}"
    monkeypatch.setenv("HTTP_PROXY", address)
    monkeypatch.setenv("HTTPS_PROXY", address)
    async with server, pool() as upstream:
        for url in ("http://api.example.test/v1/chat", "https://api.example.test/v1/chat"):
            assert await body(await upstream.send("POST", url, [], b"{}")) == b"{}"
    assert seen.requests == [
        b"POST http://api.example.test/v1/chat HTTP/1.1\r\nHost: api.example.test\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n",
        b"POST /v1/chat HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 2\r\n\r\n{}",
    ]


def test_a_client_path_never_leaves_the_upstreams_origin() -> None:
    """An upstream URL without a path, and a client path whose slash after /v1 is escaped:
    the gateway's key must still go to the upstream, not to a host named in the path."""
    upstream = Upstream("http://vllm.internal:8000", "sk-key", transport=None)  # type: ignore[arg-type]
    for raw in (b"/v1%2F@evil.example/x", b"/v1%2f@evil.example:80/v1/models", b"/v1/models"):
        url = upstream.url(raw, b"")
        assert urlsplit(url).hostname == "vllm.internal", url


@on_both_loops
async def test_the_pool_drops_trailers_and_frees_a_connection_whose_body_was_never_sent() -> None:
    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
            b"X-Trailer: late\r\n\r\n"
        )
        return True

    async with raw_server(respond) as (url, seen), pool(upstream_max_connections=1) as upstream:
        response = await upstream.send("GET", url + "/", [], b"")
        assert await body(response) == b"{}"
        assert all(name != b"X-Trailer" for name, _ in response.headers)
    # An upstream that never reads: a request body it is sent stays in the buffer. The
    # client gives up (its task cancelled); the one connection the pool may open is free
    # at once, not when the upstream has read the rest.
    accepted = 0

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await asyncio.sleep(30)

    stuck = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    stuck_url = f"http://127.0.0.1:{stuck.sockets[0].getsockname()[1]}"
    async with stuck, pool(upstream_max_connections=1, upstream_timeout=1.0) as upstream:
        request = asyncio.ensure_future(upstream.send("POST", stuck_url + "/", [], b"x" * 2**24))
        await asyncio.sleep(0.2)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        with pytest.raises(UpstreamTimeout):  # no head comes: but it got a connection
            await upstream.send("GET", stuck_url + "/", [], b"")
        assert accepted == 2


@on_both_loops
async def test_a_waiter_cancelled_as_it_is_woken_passes_its_turn_on() -> None:
    loop = asyncio.get_running_loop()
    async with (
        raw_server(lambda w, n: answer(w, OK)) as (url, seen),
        pool(upstream_max_connections=1, upstream_timeout=3.0) as upstream,
    ):
        held = await upstream.send("GET", url + "/", [], b"")
        second = asyncio.ensure_future(upstream.send("GET", url + "/", [], b""))
        third = asyncio.ensure_future(upstream.send("GET", url + "/", [], b""))
        await asyncio.sleep(0.05)  # both wait for the one connection
        assert await body(held) == b"{}"  # given back: the second is woken...
        second.cancel()  # ...and its client leaves in the same turn of the loop
        started = loop.time()
        assert await body(await third) == b"{}"
        assert loop.time() - started < 2.0  # not left waiting for UPSTREAM_TIMEOUT
        assert second.cancelled()


@on_both_loops
async def test_a_stale_reused_connection_is_retried_only_for_what_may_be_sent_twice() -> None:
    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        if n in (2, 4):  # an idle connection the upstream was closing as it was reused
            return False
        writer.write(OK)
        return True

    async with raw_server(respond) as (url, seen), pool() as upstream:
        assert await body(await upstream.send("GET", url + "/", [], b"")) == b"{}"
        # A GET is sent again, on a new connection...
        assert await body(await upstream.send("GET", url + "/", [], b"")) == b"{}"
        # ...a POST is not: it may have been read and acted on.
        with pytest.raises(UpstreamUnreachable):
            await upstream.send("POST", url + "/", [], b"{}")
    assert (len(seen.requests), seen.connections) == (4, 2)
