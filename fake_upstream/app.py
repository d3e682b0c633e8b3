"""A fake OpenAI upstream, as pure ASGI so that it is never the bottleneck of a benchmark.

Request headers switch its behaviour (the OpenAI SDK sets them with ``extra_headers``, and the
gateway forwards them):

- ``X-Fake-Chunks: N``            content chunks in the answer (default 8)
- ``X-Fake-First-Byte-Delay: s``  seconds before the response starts
- ``X-Fake-Chunk-Delay: s``       seconds between two SSE events
- ``X-Fake-Status: 429``          answer that status with OpenAI's error body
- ``X-Fake-Error-Message: text``  ... whose message is that text (an upstream quoting a request)
- ``X-Fake-Reset-After: K``       streams only: send K events, then break the connection
- ``X-Fake-Hang: s``              sleep that long (at most 120) before answering
- ``X-Fake-Response-Status: incomplete|failed``  ``/v1/responses``: end the response so
- ``X-Fake-Stream-Error: 1``       ``/v1/responses`` streams: an ``error`` event mid-stream
- ``X-Fake-Split-Bytes: N``       streams: each event sent in pieces of N bytes

It answers ``/v1/chat/completions``, ``/v1/responses`` (and ``GET``, ``DELETE``,
``/input_items`` and ``/cancel`` of the responses it keeps: see ``fake_upstream.responses_api``),
``/v1/embeddings``, the legacy ``/v1/completions``, ``/v1/models``, and Anthropic's
``/v1/messages`` (``fake_upstream.messages_api``); streamed or not where they stream.

An upstream started with ``behaviour`` (``--behave X-Fake-Status=503``) acts on those headers
for every request that does not send its own: one fake of several that fails, stalls or
breaks whatever the client asked. ``models`` sets what ``GET /v1/models`` lists.

``GET /_fake/requests`` lists what it received (``DELETE`` clears it); ``GET /_fake/stats``
counts streams started, completed and abandoned by their client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson

from fake_upstream import messages_api, responses
from fake_upstream.responses_api import ResponseStore

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
    def __init__(
        self,
        history: int = 5000,
        behaviour: dict[str, str] | None = None,
        models: list[str] | None = None,
    ) -> None:
        self.behaviour = {
            name.lower().encode(): value.encode() for name, value in (behaviour or {}).items()
        }
        self.models = models
        self.received: deque[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = deque(
            maxlen=history
        )
        self.stats = {"streams_started": 0, "streams_completed": 0, "streams_abandoned": 0}
        self.responses = ResponseStore()

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
        headers = {
            **self.behaviour,
            **{k.lower(): v for k, v in scope["headers"] if k.lower().startswith(b"x-fake-")},
        }
        await _pause(headers.get(b"x-fake-hang"), cap=120.0)
        await _pause(headers.get(b"x-fake-first-byte-delay"), cap=60.0)
        if b"x-fake-status" in headers:
            status = int(headers[b"x-fake-status"])
            said = headers.get(b"x-fake-error-message")
            anthropic = path.startswith("/v1/messages")
            error = messages_api.error if anthropic else responses.error
            await _send(send, status, error(status, said.decode() if said else None))
            return
        await self._route(
            method, path, body, headers, receive, send, scope.get("query_string", b"")
        )

    async def _route(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: dict[bytes, bytes],
        receive: Receive,
        send: Send,
        query: bytes = b"",
    ) -> None:
        if method == "GET" and path == "/v1/models":
            await _send(send, 200, responses.models(self.models))
            return
        if method == "GET" and path.startswith("/v1/models/"):
            await _send(send, 200, responses.model(path.removeprefix("/v1/models/")))
            return
        if path.startswith("/v1/responses/"):
            await _send(
                send, *self.responses.resource(method, path[len("/v1/responses/") :], query)
            )
            return
        if method == "POST" and path in ("/v1/messages", "/v1/messages/count_tokens"):
            await self._messages(path, body, headers, receive, send)
            return
        if method != "POST" or path not in {
            "/v1/chat/completions",
            "/v1/responses",
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
            await _send(send, *responses.embeddings(request))
        elif path == "/v1/completions":
            await self._completions(request, headers, receive, send)
        elif path == "/v1/responses":
            await self._responses(request, headers, receive, send)
        else:
            await self._chat(request, headers, receive, send)

    async def _chat(
        self, request: dict[str, Any], headers: dict[bytes, bytes], receive: Receive, send: Send
    ) -> None:
        if not isinstance(request.get("messages"), list):
            await _send(send, 400, responses.error(400, "'messages' is required.", "messages"))
            return
        answer = responses.Answer(request, _chunks(headers))
        if request.get("stream") is not True:
            await _send(send, 200, answer.completion())
            return
        await self._stream(answer.events(_include_usage(request)), headers, receive, send)

    async def _messages(
        self, path: str, body: bytes, headers: dict[bytes, bytes], receive: Receive, send: Send
    ) -> None:
        """Anthropic's Messages API: see ``fake_upstream.messages_api``."""
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            request = None
        refused = messages_api.validate(request)
        if refused is not None and not (path.endswith("/count_tokens") and request):
            await _send(send, 400, refused)
        elif path.endswith("/count_tokens"):
            await _send(send, 200, messages_api.count_tokens(request))
        else:
            reply = messages_api.Reply(request, _chunks(headers))
            if request.get("stream") is True:
                await self._stream(reply.events(), headers, receive, send)
            else:
                await _send(send, 200, reply.message())

    async def _completions(
        self, request: dict[str, Any], headers: dict[bytes, bytes], receive: Receive, send: Send
    ) -> None:
        answer = responses.text_completion(request, _chunks(headers))
        if isinstance(answer, bytes):
            await _send(send, 400, answer)
        elif request.get("stream") is not True:
            await _send(send, 200, answer.completion())
        else:
            await self._stream(answer.events(_include_usage(request)), headers, receive, send)

    async def _responses(
        self, request: dict[str, Any], headers: dict[bytes, bytes], receive: Receive, send: Send
    ) -> None:
        broken = headers.get(b"x-fake-stream-error", b"0") not in (b"", b"0")
        answer = self.responses.create(
            request,
            chunks=_chunks(headers),
            outcome=headers.get(b"x-fake-response-status", b"completed").decode().lower(),
            broken=broken,
            delay=_delay(headers),
        )
        if isinstance(answer, tuple):
            await _send(send, *answer)
        elif request.get("stream") is True:
            await self._stream(answer.events(broken), headers, receive, send)
        elif answer.background:
            await _send(send, 200, orjson.dumps(answer.body("queued")))
        else:
            await _send(send, 200, orjson.dumps(answer.body()))

    async def _stream(
        self, events: Iterable[bytes], headers: dict[bytes, bytes], receive: Receive, send: Send
    ) -> None:
        """Sends ``events`` as an SSE stream, with X-Fake-Chunk-Delay between two of them, and
        breaking the connection at X-Fake-Reset-After, each event in pieces of
        X-Fake-Split-Bytes bytes if given."""
        delay = _delay(headers)
        reset_after = int(headers.get(b"x-fake-reset-after", b"-1"))
        piece = int(headers.get(b"x-fake-split-bytes", b"0"))
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
                if piece:  # X-Fake-Split-Bytes: the event in pieces, as a network may cut it
                    for at in range(0, len(event), piece):
                        part = event[at : at + piece]
                        await send({"type": "http.response.body", "body": part, "more_body": True})
                else:
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


def create_app(
    behaviour: dict[str, str] | None = None, models: list[str] | None = None
) -> FakeUpstream:
    return FakeUpstream(behaviour=behaviour, models=models)


def _chunks(headers: dict[bytes, bytes]) -> int:
    return int(headers.get(b"x-fake-chunks", b"8"))


def _delay(headers: dict[bytes, bytes]) -> float:
    return float(headers.get(b"x-fake-chunk-delay", b"0"))


def _include_usage(request: dict[str, Any]) -> bool:
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


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
