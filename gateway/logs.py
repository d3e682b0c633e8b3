"""Request ids for the log: with ``LOG_FORMAT=json`` each HTTP request gets one, named by
every line logged while it is served (``storage/logs.py``) and sent back to its client in
the ``X-Gateway-Request-Id`` header. Plain logs go without, and so does the request path.
"""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.logs import REQUEST_ID

HEADER = b"x-gateway-request-id"


class RequestIds:
    """Gives each HTTP request an id (the upstream's own ``x-request-id`` is relayed as it
    came, beside it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = os.urandom(8).hex()
        named = (HEADER, request_id.encode())

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), named]
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, sending)
        finally:
            REQUEST_ID.reset(token)
