"""A fake OpenAI upstream, as pure ASGI so that it is never the bottleneck of a benchmark.

Request headers switch its behaviour (the OpenAI SDK sets them with ``extra_headers``, and the
gateway forwards them):

- ``X-Fake-Chunks: N``            content chunks in the answer (default 8)
- ``X-Fake-First-Byte-Delay: s``  seconds before the response starts
- ``X-Fake-Chunk-Delay: s``       seconds between two SSE events
- ``X-Fake-Status: 429``          answer that status with OpenAI's error body
- ``X-Fake-Reset-After: K``       streams only: send K events, then break the connection
- ``X-Fake-Hang: s``              sleep that long (at most 120) before answering

``GET /_fake/requests`` lists what it received (``DELETE`` clears it); ``GET /_fake/stats``
counts streams started, completed and abandoned by their client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from fake_upstream import responses

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = (b"content-type", b"application/json")
SSE_TYPE = (b"content-type", b"text/event-stream; charset=utf-8")
# OpenAI's answers set Cloudflare cookies; a gateway must relay them, never keep them.
COMMON = [
    (b"x-request-id", b"req_fake"),
    (b"openai-processing-ms", b"1"),
    (b"set-cookie", b"_cfuvid=fake-cookie; path=/; HttpOnly"),
]


class ConnectionReset(Exception):
    """Raised mid-response on purpose: uvicorn then drops the connection unfinished."""


class FakeUpstream:
    def __init__(self, history: int = 5000) -> None:
        self.received: deque[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = deque(
            maxlen=history
        )
        self.stats = {"streams_started": 0, "streams_completed": 0, "streams_abandoned": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        method, path = scope["method"], scope["path"]
        if path.startswith("/_fake/"):
            await self._introspect(method, path, send)
            return
        self.received.append((method, path, scope["headers"], body))
        headers = {k.lower(): v for k, v in scope["headers"] if k.lower().startswith(b"x-fake-")}
        await _pause(headers.get(b"x-fake-hang"), cap=120.0)
        await _pause(headers.get(b"x-fake-first-byte-delay"), cap=60.0)
        if b"x-fake-status" in headers:
            status = int(headers[b"x-fake-status"])
            await _send(send, status, responses.error(status))
            return
        await self._route(method, path, body, headers, receive, send)

    async def _route(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: dict[bytes, bytes],
        receive: Receive,
        send: Send,
    ) -> None:
        if method == "GET" and path == "/v1/models":
            await _send(send, 200, responses.models())
            return
        if method == "GET" and path.startswith("/v1/models/"):
            await _send(send, 200, responses.model(path.removeprefix("/v1/models/")))
            return
        if method != "POST" or path not in {
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/completions",
        }:
            await _send(send, 404, responses.error(404, f"Invalid URL ({method} {path})"))
            return
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            await _send(send, 400, responses.error(400, "We could not parse the JSON body."))
            return
        if not isinstance(request, dict):
            await _send(send, 400, responses.error(400, "The body must be a JSON object."))
            return
        if path == "/v1/embeddings":
            await _send(send, 200, responses.embeddings(request))
        elif path == "/v1/completions":
            await _send(send, 200, responses.text_completion(request))
        else:
            await self._chat(request, headers, receive, send)

    async def _chat(
        self, request: dict[str, Any], headers: dict[bytes, bytes], receive: Receive, send: Send
    ) -> None:
        if not isinstance(request.get("messages"), list):
            await _send(send, 400, responses.error(400, "'messages' is required.", "messages"))
            return
        answer = responses.Answer(request, int(headers.get(b"x-fake-chunks", b"8")))
        if request.get("stream") is not True:
            await _send(send, 200, answer.completion())
            return
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        delay = float(headers.get(b"x-fake-chunk-delay", b"0"))
        reset_after = int(headers.get(b"x-fake-reset-after", b"-1"))
        await self._stream(answer.events(include_usage), delay, reset_after, receive, send)

    async def _stream(
        self, events: Any, delay: float, reset_after: int, receive: Receive, send: Send
    ) -> None:
        self.stats["streams_started"] += 1
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, gone))
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [SSE_TYPE, *COMMON]}
            )
            for sent, event in enumerate(events):
                if sent == reset_after:
                    raise ConnectionReset("X-Fake-Reset-After")
                if gone.is_set():
                    self.stats["streams_abandoned"] += 1
                    return
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if delay:
                    await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": b""})
            self.stats["streams_completed"] += 1
        finally:
            watcher.cancel()

    async def _introspect(self, method: str, path: str, send: Send) -> None:
        if path == "/_fake/stats":
            await _send(send, 200, orjson.dumps(self.stats))
        elif method == "DELETE":
            self.received.clear()
            for name in self.stats:
                self.stats[name] = 0
            await _send(send, 200, b"{}")
        else:
            await _send(
                send,
                200,
                orjson.dumps(
                    [
                        {
                            "method": m,
                            "path": p,
                            "headers": {
                                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in h
                            },
                            "body": b.decode(errors="replace"),
                        }
                        for m, p, h, b in self.received
                    ]
                ),
            )


def create_app() -> FakeUpstream:
    return FakeUpstream()


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [JSON_TYPE, (b"content-length", str(len(body)).encode()), *COMMON],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _pause(value: bytes | None, cap: float) -> None:
    if value:
        await asyncio.sleep(min(float(value), cap))


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
