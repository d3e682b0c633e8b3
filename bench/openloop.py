"""An open-loop load generator: requests are sent on a fixed schedule, whether or not the
earlier ones have been answered, and each latency is measured from the time the request
was *due*, not from when it was sent. A closed loop (wrk, or a client that waits for each
answer) slows down when the server does and so hides the stalls (coordinated omission);
this one does not.

Keep-alive connections are reused when idle and opened when none is (that cost counts).
Responses are parsed by httptools (llhttp, in C), so the generator stays cheap next to
what it measures.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools


@dataclass
class Sample:
    first_byte: float  # seconds from due time to the first byte of the body
    done: float  # seconds from due time to the end of the response
    status: int


@dataclass
class Result:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    late_sends: int = 0  # requests sent more than 1 ms after they were due


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[float, float, int]] | None = None
        self.first_byte = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("closed"))

    def _fail(self, error: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)

    def on_message_begin(self) -> None:
        self.first_byte = 0.0

    def on_body(self, body: bytes) -> None:
        if not self.first_byte:
            self.first_byte = time.perf_counter()

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.first_byte or now, now, self.parser.get_status_code()))

    def request(self, payload: bytes) -> asyncio.Future[tuple[float, float, int]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter


async def run(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    rate: float,
    seconds: float,
    warm_connections: int = 16,
) -> Result:
    """Send ``rate`` requests per second for ``seconds``; ``make_request(n)`` gives the raw
    HTTP/1.1 request number ``n``."""
    loop = asyncio.get_running_loop()
    idle: deque[_Connection] = deque()
    result = Result()

    async def connect() -> _Connection:
        _, connection = await loop.create_connection(_Connection, host, port)
        return connection

    for _ in range(warm_connections):
        idle.append(await connect())

    async def one(due: float, payload: bytes) -> None:
        try:
            connection = idle.pop() if idle else await connect()
            first, done, status = await connection.request(payload)
        except (OSError, httptools.HttpParserError):
            result.errors += 1
            return
        result.samples.append(Sample(first - due, done - due, status))
        if status >= 400:
            result.errors += 1
        if not connection.closed:
            idle.append(connection)

    count = int(rate * seconds)
    interval = 1.0 / rate
    tasks = set()
    start = time.perf_counter() + 0.05
    for n in range(count):
        due = start + n * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            result.late_sends += 1
        task = loop.create_task(one(due, make_request(n)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    for connection in idle:
        if connection.transport is not None:
            connection.transport.close()
    return result
