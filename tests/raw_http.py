"""A lean HTTP/1.1 client for load in tests: one keep-alive connection, one request at a
time, responses parsed by httptools. Thousands of requests in a test cost the test's own
process several times less CPU than through httpx, which on two cores is most of the
time such a test takes."""

from __future__ import annotations

import asyncio

import httptools


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` (JSON) to ``path``; the status and the whole body (a stream's
        events, de-chunked, for a streamed answer)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nAuthorization: Bearer sk-load\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        try:
            while not response.complete:
                data = await self._reader.read(65536)
                if not data:
                    raise ConnectionError("connection closed before the end of the answer")
                parser.feed_data(data)
        except BaseException:
            self.close()
            raise
        if not parser.should_keep_alive():
            self.close()
        return parser.get_status_code(), b"".join(response.body)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class _Response:
    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
