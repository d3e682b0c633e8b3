"""The ``/v1`` proxy, as a pure ASGI app: the calls of every captured API (``capture/registry``)
relayed and recorded, every other route relayed and logged.

The relay forwards the upstream's bytes as they arrive. For a stream it forwards whole SSE
events (an event cut in two by the network waits for its second half), which lets it hold back
what the gateway added for its own needs (the usage chat asks for on a client's behalf).
Everything else about capture happens after the bytes are sent, or later in the writer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from capture.api import Api, InvalidBody
from capture.exchange import (
    CLIENT_DISCONNECTED,
    UPSTREAM_DISCONNECTED,
    Exchange,
    RequestLog,
    route_of,
)
from capture.registry import captured
from capture.rows import Record
from capture.sse import EventSplitter
from gateway.asgi import (
    HOP_BY_HOP,
    ClientGone,
    DisconnectWatch,
    Headers,
    Receive,
    Scope,
    Send,
    connection_listed,
    header,
    read_body,
    send_error,
)
from gateway.auth import Authenticator, Caller
from gateway.client_ip import client_ip
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.metrics import Metrics
from gateway.routing import ANTHROPIC, OPENAI, Router, format_of
from gateway.settings import Settings
from gateway.upstream import Upstream, UpstreamBroke, UpstreamResponse, content_type, is_success

log = logging.getLogger("mes.proxy")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
# Headers the gateway reads itself and never sends on.
_CONSUMED = frozenset({b"host", b"content-length", b"x-conversation-id"})
_CREDENTIALS = frozenset({b"authorization", b"api-key", b"x-api-key"})
# What makes the gateway try the next upstream: too many requests, or the upstream failing.
_RETRIED = frozenset({429, 500, 502, 503, 504})
MODEL_LIST_SECONDS = 5.0  # how long the merged GET /v1/models is kept
_EVENT_STREAM = "text/event-stream"
_STREAM_ERROR = (
    b'data: {"error":{"message":"The upstream connection was lost before the answer was '
    b'complete.","type":"upstream_error","param":null,"code":"upstream_disconnected"}}\n\n'
)


class Proxy:
    def __init__(
        self,
        settings: Settings,
        router: Router,
        authenticator: Authenticator,
        capture: Callable[[Record], bool],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.router = router
        self.authenticator = authenticator
        self.capture = capture
        self.metrics = metrics
        self._managed = settings.managed_mode
        self._model_lists: dict[str | None, tuple[float, bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: Headers = scope["headers"]
        path: str = scope["path"]
        try:
            authorization, key, length = _read_heads(headers)
            caller = await self.authenticator.identify(authorization, key)
            body = await read_body(
                receive,
                self.settings.max_body_bytes,
                int(length) if length and length.isdigit() else None,
            )
            api = captured(scope["method"], path)
            if api is not None:
                request = _parse(api, body)
            if self.router.single:
                chain = self.router.upstreams
            elif api is not None:
                chain = self._chain(path, request.get("model"))
            elif scope["method"] == "GET" and path == "/v1/models":
                chain = ()  # the gateway answers: the lists of every upstream, merged
            else:
                chain = self._chain(path, _model_of(path, headers, body))
        except GatewayError as error:
            self.metrics.inc("requests_rejected")
            await send_error(send, error, anthropic=path.startswith("/v1/messages"))
            return
        except ClientGone:
            return
        if api is not None:
            await self._captured(scope, receive, send, caller, api, body, request, chain)
        else:
            await self._relay(scope, receive, send, caller, body, chain)

    def _chain(self, path: str, model: object) -> tuple[Upstream, ...]:
        """The upstreams to try for a request to ``path`` for ``model``, in order."""
        name = model if isinstance(model, str) else None
        chain = self.router.chain(format_of(path), name)
        if not chain:
            raise ModelNotFound(
                f"The model '{name}' does not exist or is not served by this gateway."
                if name is not None
                else f"No upstream of this gateway serves {path}.",
                param="model",
            )
        return chain

    async def _open(
        self,
        method: str,
        scope: Scope,
        read: bool,
        body: bytes,
        chain: tuple[Upstream, ...],
        record: Exchange | RequestLog,
    ) -> UpstreamResponse:
        """The answer of the first upstream of ``chain`` that gives one, trying the next
        while one cannot be reached, does not answer in time, or answers 429 or 5xx (the
        last one's answer, whatever it is, goes to the client); nothing has gone to the
        client yet. The record names the upstream; where it took more than one try, its
        ``attempts`` list them all (one try, the common case, costs no list)."""
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        last = len(chain) - 1
        attempts = record.attempts
        for index, upstream in enumerate(chain):
            began = time.perf_counter()
            record.upstream = upstream.name
            try:
                response = await upstream.transport.send(
                    method,
                    upstream.url(path, query),
                    self._upstream_headers(scope["headers"], read, upstream),
                    body,
                )
            except (UpstreamUnreachable, UpstreamTimeout) as error:
                self.metrics.inc("upstream_errors")
                attempts.append({"upstream": upstream.name, "error": error.code, "ms": _ms(began)})
                if index == last:
                    raise
                self.metrics.inc("upstream_failovers")
                continue
            if index == last or response.status not in _RETRIED:
                if attempts:
                    attempts.append(
                        {"upstream": upstream.name, "status": response.status, "ms": _ms(began)}
                    )
                return response
            attempts.append(
                {"upstream": upstream.name, "status": response.status, "ms": _ms(began)}
            )
            response.close()
            self.metrics.inc("upstream_failovers")
        raise AssertionError("a chain has at least one upstream")

    def _upstream_headers(self, headers: Headers, read: bool, upstream: Upstream) -> Headers:
        dropped = HOP_BY_HOP | _CONSUMED | connection_listed(headers)
        if self._managed:  # the client's key is the gateway's: it never goes upstream
            dropped |= _CREDENTIALS
        forwarded = [
            (name, value)
            for name, value in headers
            if name.lower() not in dropped and not (read and name.lower() == b"accept-encoding")
        ]
        if read:  # the gateway reads the answer, so it asks for it uncompressed
            forwarded.append((b"accept-encoding", b"identity"))
        credentials = upstream.credentials
        if credentials is not None:
            forwarded.append(credentials)
        return forwarded

    def _exchange(
        self, scope: Scope, caller: Caller, api: Api, request: dict[str, object]
    ) -> Exchange:
        headers: Headers = scope["headers"]
        return api.record(
            owner=caller.owner,
            key_fingerprint=caller.key_fingerprint,
            client_ip=self._client_ip(scope),
            user_agent=header(headers, b"user-agent"),
            conversation_header=header(headers, b"x-conversation-id"),
            request=request,
            stream=request.get("stream") is True,
            started_at=datetime.now(UTC).replace(tzinfo=None),
            traceparent=header(headers, b"traceparent") if self.settings.otel_enabled else None,
        )

    def _client_ip(self, scope: Scope) -> str | None:
        peer = scope.get("client")
        return client_ip(
            peer[0] if peer else None,
            header(scope["headers"], b"x-forwarded-for"),
            self.settings.trusted_proxies,
        )

    async def _captured(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        caller: Caller,
        api: Api,
        body: bytes,
        request: dict[str, object],
        chain: tuple[Upstream, ...],
    ) -> None:
        exchange = self._exchange(scope, caller, api, request)
        upstream_body, added = api.upstream_body(request, body)
        anthropic = format_of(scope["path"]) == ANTHROPIC
        started = time.perf_counter()
        response: UpstreamResponse | None = None
        watch = DisconnectWatch(receive)
        captured = False

        def finish() -> None:
            """Hand the record to the spool: before the client gets the end of its answer,
            so that an answer a client has whole is never one the gateway has lost."""
            nonlocal captured
            if captured:
                return
            captured = True
            if watch.disconnected:
                exchange.cut_short = CLIENT_DISCONNECTED
                exchange.status = exchange.status or CLIENT_CLOSED_REQUEST
                exchange.error_type = exchange.error_type or CLIENT_DISCONNECTED
                self.metrics.inc("client_disconnects")
            exchange.latency_ms = _since(started)
            self.metrics.inc("requests")
            self.metrics.requests_seconds.observe(
                (scope["path"], str(exchange.status)), exchange.latency_ms / 1000.0
            )
            self.capture(exchange)

        try:
            async with watch:
                response = await self._open("POST", scope, True, upstream_body, chain, exchange)
                exchange.status = response.status
                exchange.first_byte_ms = _since(started)
                events = _EVENT_STREAM in content_type(response)
                if exchange.stream and is_success(response) and events:
                    events_out = api.client_events if added else None
                    await self._relay_events(
                        send, response, exchange, started, events_out, api.last_event, finish
                    )
                else:
                    await self._relay_whole(send, response, exchange, api, finish)
        except GatewayError as error:
            exchange.status = error.status
            exchange.error_type = error.code
            exchange.error_message = error.message
            finish()
            await send_error(send, error, anthropic)
        finally:
            if response is not None:
                response.close()
            finish()

    async def _relay_events(
        self,
        send: Send,
        response: UpstreamResponse,
        exchange: Exchange,
        started: float,
        client_events: Callable[[list[bytes], bytes], bytes] | None,
        last_event: Callable[[bytes], bool],
        finish: Callable[[], None],
    ) -> None:
        """Relay a stream event by event; ``client_events``, if given, takes out of each
        batch of events what the gateway added upstream."""
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": _response_headers(response, keep_length=False),
            }
        )
        splitter = EventSplitter()
        chunks = exchange.chunks
        held = b""  # the closing event ("data: [DONE]", say) waits until the record is spooled
        try:
            async for raw in response.chunks():
                events = splitter.feed(raw)
                if not events:
                    continue
                whole = events[0] if len(events) == 1 else b"".join(events)
                chunks.append((_since(started), whole))
                if last_event(events[-1]):
                    held, events = events[-1], events[:-1]
                    whole = b"".join(events)
                out = client_events(events, whole) if client_events and events else whole
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamBroke as error:
            self.metrics.inc("upstream_errors")
            exchange.cut_short = UPSTREAM_DISCONNECTED
            exchange.error_type = UPSTREAM_DISCONNECTED
            exchange.error_message = f"upstream stream broke: {error}"
            held = held or _STREAM_ERROR  # the closing event came: the answer is whole
        finish()
        await send({"type": "http.response.body", "body": held, "more_body": False})

    async def _relay_whole(
        self,
        send: Send,
        response: UpstreamResponse,
        exchange: Exchange,
        api: Api,
        finish: Callable[[], None],
    ) -> None:
        try:
            parts = [raw async for raw in response.chunks()]
        except UpstreamBroke as error:
            if error.timed_out:
                raise UpstreamTimeout("The upstream did not finish its answer in time.") from None
            raise UpstreamUnreachable("The upstream connection broke during the answer.") from None
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        exchange.response_body = api.kept_answer(response.status, body)
        finish()
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": _response_headers(response, keep_length=False)
                + [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _relay(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        caller: Caller,
        body: bytes,
        chain: tuple[Upstream, ...],
    ) -> None:
        log_row = RequestLog(
            owner=caller.owner,
            key_fingerprint=caller.key_fingerprint,
            method=scope["method"],
            path=scope["path"],
            client_ip=self._client_ip(scope),
            user_agent=header(scope["headers"], b"user-agent"),
            started_at=datetime.now(UTC).replace(tzinfo=None),
            bytes_in=len(body),
        )
        started = time.perf_counter()
        response: UpstreamResponse | None = None
        watch = DisconnectWatch(receive)
        try:
            async with watch:
                if not chain:
                    await self._merged_models(scope, send, caller, log_row)
                    return
                response = await self._open(scope["method"], scope, False, body, chain, log_row)
                log_row.status = response.status
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": _response_headers(response, keep_length=True),
                    }
                )
                try:
                    async for raw in response.chunks():
                        log_row.bytes_out += len(raw)
                        await send({"type": "http.response.body", "body": raw, "more_body": True})
                except UpstreamBroke as error:
                    log_row.error_type = UPSTREAM_DISCONNECTED
                    log.warning("upstream broke mid-response: %s", error)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except GatewayError as error:
            log_row.status = error.status
            log_row.error_type = error.code
            await send_error(send, error, format_of(scope["path"]) == ANTHROPIC)
        finally:
            if response is not None:
                response.close()
            if watch.disconnected:
                log_row.status = log_row.status or CLIENT_CLOSED_REQUEST
                log_row.error_type = CLIENT_DISCONNECTED
            log_row.latency_ms = _since(started)
            self.metrics.inc("requests")
            self.metrics.requests_seconds.observe(
                (route_of(log_row.path), str(log_row.status)), log_row.latency_ms / 1000.0
            )
            self.capture(log_row)

    async def _merged_models(
        self, scope: Scope, send: Send, caller: Caller, log_row: RequestLog
    ) -> None:
        """``GET /v1/models`` across the OpenAI-format upstreams: their lists merged (the
        first to list a model wins), kept a few seconds per caller. An upstream that does
        not answer is left out, and logged; with none answering, the client gets a 502."""
        key = caller.key_fingerprint
        kept = self._model_lists.get(key)
        if kept is None or kept[0] < time.monotonic():
            upstreams = self.router.of_format(OPENAI)
            lists = await asyncio.gather(*(self._models_of(u, scope) for u in upstreams))
            if all(found is None for found in lists):
                raise UpstreamUnreachable("No upstream answered with its list of models.")
            merged: list[Any] = []
            seen: set[object] = set()
            for found in lists:
                for model in found or ():
                    if isinstance(model, dict) and model.get("id") not in seen:
                        seen.add(model.get("id"))
                        merged.append(model)
            if len(self._model_lists) >= 1024:
                self._model_lists.clear()
            kept = (
                time.monotonic() + MODEL_LIST_SECONDS,
                orjson.dumps({"object": "list", "data": merged}),
            )
            self._model_lists[key] = kept
        body = kept[1]
        log_row.status, log_row.bytes_out = 200, len(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _models_of(self, upstream: Upstream, scope: Scope) -> list[Any] | None:
        """One upstream's models, or None (logged) if it does not give them."""
        headers = self._upstream_headers(scope["headers"], True, upstream)
        try:
            response = await upstream.transport.send(
                "GET", upstream.url(b"/v1/models", b""), headers, b""
            )
            try:
                body = b"".join([raw async for raw in response.chunks()])
            finally:
                response.close()
            found = orjson.loads(body).get("data") if is_success(response) else None
            if not isinstance(found, list):
                raise ValueError(f"status {response.status}, no list of models")
            return found
        except (GatewayError, UpstreamBroke, ValueError, AttributeError) as error:
            log.warning("GET /v1/models: upstream %s left out (%s)", upstream.name, error)
            return None


def _read_heads(headers: Headers) -> tuple[str | None, str | None, str | None]:
    """The headers the proxy reads before anything else, in one pass: ``Authorization``,
    the key of ``api-key`` (Azure's clients) or ``x-api-key`` (Anthropic's), and
    ``Content-Length``. ASGI servers give header names in lower case."""
    authorization = key = length = None
    for name, value in headers:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"content-length":
            length = value.decode("latin-1")
        elif name in _KEY_HEADERS and key is None:
            key = value.decode("latin-1")
    return authorization, key, length


_KEY_HEADERS = frozenset({b"api-key", b"x-api-key"})


def _model_of(path: str, headers: Headers, body: bytes) -> str | None:
    """The model a request the gateway does not capture is for, to route it: ``model`` in
    a JSON body (``/v1/messages/count_tokens``), or the id in ``/v1/models/{id}``."""
    if path.startswith("/v1/models/"):
        return path.removeprefix("/v1/models/")
    if not body or "json" not in (header(headers, b"content-type") or ""):
        return None
    try:
        found = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = found.get("model") if isinstance(found, dict) else None
    return model if isinstance(model, str) else None


def _ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000.0, 3)


def _parse(api: Api, body: bytes) -> dict[str, object]:
    try:
        return api.parse(body)
    except InvalidBody as error:
        raise InvalidRequest(error.message, param=error.param) from None


def _response_headers(response: UpstreamResponse, keep_length: bool) -> Headers:
    raw = response.headers
    dropped = HOP_BY_HOP | connection_listed(raw)
    if not keep_length:
        dropped = dropped | {b"content-length"}
    return [(name.lower(), value) for name, value in raw if name.lower() not in dropped]


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
