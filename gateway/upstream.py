"""The gateway's connection pool to the upstream, on aiohttp's client.

Chosen by measurement (wrk at concurrency 16, capture into SQLite, one worker): with
httpx's own pool the gateway served ~610 requests/s, spending almost half its time in
httpcore's pool (each request polls every idle connection, encode/httpx#3215); with httpx
over the ``httpx-aiohttp`` transport, ~1,950; with aiohttp's client used directly, without
httpx's request and cookie layers on top, ~2,750. aiohttp parses responses in C.

The pool forwards what the gateway gives it and adds nothing of its own: no ``User-Agent``,
``Accept`` or ``Accept-Encoding`` of aiohttp's, no content type, and no cookies (an
upstream's ``Set-Cookie`` is relayed to its client, never kept and replayed for the next
caller). Bodies come back as the upstream sent them, still compressed if they were.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from gateway.asgi import Headers
from gateway.errors import UpstreamTimeout, UpstreamUnreachable
from gateway.settings import Settings

log = logging.getLogger("mes.upstream")

# Idle connections are let go before the usual server-side idle timeouts (uvicorn's and
# Node's 5 s): reusing one the upstream is closing at that instant fails the request.
KEEPALIVE_SECONDS = 4.0
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")


class UpstreamBroke(Exception):
    """The upstream's answer stopped before its end: the connection broke or went quiet for
    longer than ``UPSTREAM_TIMEOUT``."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class UpstreamResponse:
    """An upstream answer whose head has arrived; its body is read with ``chunks()``."""

    __slots__ = ("_response", "status", "headers")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Headers = list(response.raw_headers)

    @property
    def content_type(self) -> str:
        return self._response.headers.get("Content-Type", "")

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (after transfer decoding, never decompressed)."""
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except TimeoutError:
            raise UpstreamBroke("ReadTimeout", timed_out=True) from None
        except (aiohttp.ClientError, OSError) as error:
            raise UpstreamBroke(type(error).__name__, timed_out=False) from None

    def close(self) -> None:
        """Give the connection back if the answer was read to its end; otherwise close it,
        so that an upstream still generating a stream nobody reads stops."""
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


class Upstream:
    """One pool per process, made in the lifespan (aiohttp needs a running loop)."""

    def __init__(self, settings: Settings) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.upstream_timeout,  # waiting for a free connection, and connecting
            sock_connect=settings.upstream_connect_timeout,
            sock_read=settings.upstream_timeout,  # for the head, and between two chunks
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=settings.upstream_max_connections,
                limit_per_host=0,
                keepalive_timeout=KEEPALIVE_SECONDS,
            ),
            timeout=self._timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            auto_decompress=False,
            # Proxy variables are read once here; aiohttp would otherwise look them up on
            # every request.
            trust_env=any(name in os.environ for name in _PROXY_VARIABLES),
            max_line_size=65536,
            max_field_size=65536,
        )

    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> UpstreamResponse:
        """Send a request; the answer's head is back when this returns."""
        try:
            response = await self._session.request(
                method,
                URL(url, encoded=True),  # the client's path and query, not re-quoted
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                data=body or None,
                allow_redirects=False,
                compress=False,
            )
        except TimeoutError:
            raise UpstreamTimeout("The upstream did not answer in time.") from None
        except (aiohttp.ClientError, OSError, ValueError) as error:
            log.warning("upstream unreachable: %s", type(error).__name__)
            raise UpstreamUnreachable("The upstream could not be reached.") from None
        return UpstreamResponse(response)

    async def close(self) -> None:
        await self._session.close()
