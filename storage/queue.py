"""A Redis stream between gateways and writers (``MES_QUEUE``), for more than one machine.

Without it, each gateway's writer process writes what its gateway spooled. With it:

- **A gateway** still appends every record to its local spool first, on the request path,
  exactly as without a queue. Its child process runs a ``Forwarder`` instead of a history
  writer: it follows the slot, adds each record to the stream (``XADD``, pipelined), and
  moves the spool's checkpoint past a record only once Redis has it. While Redis cannot be
  reached, records wait in the spool and go on when it answers again; the request path
  never talks to Redis.
- **A writer** (``python -m gateway writer``, any number, on any machine) runs a ``Relay``:
  it reads the stream in the consumer group ``GROUP`` (``XREADGROUP``) into a spool slot of
  its own, which a history writer process writes to the database like a gateway's, and
  acknowledges a record (``XACK``) only once that spool's checkpoint has passed it, after
  its transaction committed. A record read by a writer that died stays pending in the
  group; after ``claim_seconds`` idle another writer takes it (``XAUTOCLAIM``). A record
  may so be written twice, or added twice by a gateway killed between its ``XADD`` and its
  checkpoint; writes are idempotent on the record's id, so it is stored once.
- **The stream** is trimmed (``XTRIM MINID``) only below the oldest record some group has
  not acknowledged: every group's, ours and any other reading the stream.

Redis keeps what it holds as durably as it is configured to: a record a gateway handed to
Redis is only as safe as Redis' own log (``appendonly yes``; ``appendfsync always`` for
nothing lost when Redis itself dies, ``everysec`` for at most a second).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import takewhile
from typing import TYPE_CHECKING, Any

from storage.spool import Position, Spool
from storage.writer import Counter, until_prepared

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("mes.queue")

STREAM = "mes:records"  # the stream's key
GROUP = "mes-writers"  # the writers' consumer group
FIELD = b"r"  # each stream entry holds one spooled record, under this field
FORWARD_RECORDS = 500  # records added to the stream in one round trip
FORWARD_BYTES = 4 * 2**20
SYNC_SECONDS = 1.0
# How long a gateway keeps a record after Redis took it, by default (MES_QUEUE_DURABLE_SECONDS):
# Redis with ``appendfsync everysec`` writes its log to disk every second (two, when slow).
DURABLE_SECONDS = 2.0
POLL_SECONDS = 0.02
BLOCK_MS = 200  # how long a writer's read waits for new records in Redis
TRIM_SECONDS = 5.0
FORGET_CONSUMERS_MS = 3600_000  # a writer gone this long, with nothing pending, is dropped
_FORGET = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


def connect(url: str, *, retries: bool = True) -> Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``): short timeouts,
    since every caller retries on its own, and reads that outlast a blocking read. Without
    ``retries``, a call that fails raises at once, on the first broken connection."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options: dict[str, Any] = {} if retries else {"retry": Retry(NoBackoff(), 0)}
    return Redis.from_url(
        url,
        socket_connect_timeout=5.0,
        socket_timeout=10.0,
        health_check_interval=30,
        **options,
    )


def _trouble() -> tuple[type[BaseException], ...]:
    """What a Redis call raises while Redis is down, restarting or refusing: tried again."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


class Backoff:
    """Waits between tries, doubling from 50 ms to ``longest``; logs the first failure of a
    run of them and every hundredth, and the recovery."""

    def __init__(self, what: str, longest: float) -> None:
        self.what, self.longest = what, longest
        self.failures = 0

    async def failed(self, error: BaseException) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 100 == 0:
            log.warning(
                "%s: Redis unavailable (%s: %s), try %d: trying again",
                self.what,
                type(error).__name__,
                error,
                self.failures,
            )
        await asyncio.sleep(min(self.longest, 0.05 * 2 ** min(self.failures, 10)))

    def succeeded(self) -> None:
        if self.failures:
            log.info("%s: Redis answers again after %d failed tries", self.what, self.failures)
        self.failures = 0


class Forwarder:
    """A gateway's side: adds what its gateway spools to the stream, in spool order. The
    writer process of a gateway with ``MES_QUEUE`` runs this instead of a history writer,
    with the same face to its gateway (``ready``, ``stalled_since``, ``start``, ``close``):
    ready once ``prepare`` has set the history database up (which the gateway reads), as a
    writer would be; records go on to Redis meanwhile, and while Redis is down they wait,
    which ``stalled_since`` tells.

    A record stays in the spool ``durable_seconds`` after Redis took it: Redis with
    ``appendfsync everysec`` has it on disk by then. When a call to Redis fails (Redis
    restarted, say, and may have lost its last second), what was added since the
    checkpoint is added again: a record twice in the stream is stored once."""

    def __init__(
        self,
        url: str,
        spool: Spool,
        metrics: Counter,
        *,
        retry_seconds: float,
        durable_seconds: float = DURABLE_SECONDS,
        prepare: Callable[[], Awaitable[None]] | None = None,
        stalled_since: float | None = None,
    ) -> None:
        self.durable_seconds = durable_seconds
        # No retries inside the client: a failure must be seen, to add again what Redis may
        # have lost.
        self.redis = connect(url, retries=False)
        self.spool = spool
        self.metrics = metrics
        self.prepare = prepare
        self.ready = prepare is None
        self.reachable = False  # Redis answered the last call
        self._cursor = spool.checkpoint  # everything before is in the stream
        # Added to the stream, not yet old enough to leave the spool: when, where they end,
        # how many.
        self._sent: deque[tuple[float, Position, int]] = deque()
        self._backoff = Backoff("forwarding records to the queue", retry_seconds)
        self._progress_at = stalled_since or time.time()
        self._caught_up = stalled_since is None
        self._last_sync = self._last_ping = time.monotonic()
        # The Redis server last seen (its run id) and when: records sent before then to the
        # server still running may leave the spool (see ``_same_server``).
        self._run_id: str | None = None
        self._checked_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._preparing: asyncio.Task[None] | None = None

    @property
    def stalled_since(self) -> float | None:
        """When records last went into the stream, while some wait: None when all did."""
        return None if self._caught_up else self._progress_at

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mes-queue-forwarder")
        if self.prepare is not None:
            self._preparing = asyncio.create_task(self._set_up(self.prepare))

    async def _set_up(self, prepare: Callable[[], Awaitable[None]]) -> None:
        await until_prepared(prepare, self._backoff.longest)
        self.ready = True

    async def close(self, grace: float) -> None:
        """Forward what is spooled, for at most ``grace`` seconds; the rest stays spooled."""
        deadline = time.monotonic() + grace
        while self._cursor < self.spool.end or self._sent:
            if time.monotonic() > deadline or self._task is None or self._task.done():
                log.warning(
                    "shutdown grace over: %d bytes of records stay in the spool for next start",
                    self.spool.pending_bytes,
                )
                break
            await asyncio.sleep(POLL_SECONDS)
        for task in (self._task, self._preparing):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        await asyncio.to_thread(self.spool.close)
        await self.redis.aclose()

    async def _run(self) -> None:
        trouble = _trouble()
        while True:
            try:
                await self._step()
            except trouble as error:
                self.reachable = False
                self._rewind()
                await self._backoff.failed(error)
            except Exception:  # the spool's files (a full disk), or a bug: from the checkpoint
                log.exception(
                    "forwarding records to the queue failed: from the spool's checkpoint again"
                )
                self._rewind()
                await asyncio.sleep(self._backoff.longest)

    async def _step(self) -> None:
        entries = self._read()
        if entries:
            self._caught_up = False
        else:
            self._caught_up = True
            self._progress_at = time.time()
        if not self.reachable or time.monotonic() - self._last_ping > SYNC_SECONDS:
            self._last_ping = time.monotonic()
            # /readyz says whether Redis answers, idle or not
            restarted = await self._same_server()
            self._succeeded()
            if restarted:
                return  # from the checkpoint again
        self._commit_durable()
        if not entries:
            await self._sync()
            await asyncio.sleep(POLL_SECONDS)
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry, _ in entries:
            pipe.execute_command("XADD", STREAM, "*", FIELD, entry)
        await pipe.execute()
        self._succeeded()
        self._cursor = entries[-1][1]
        self._sent.append((time.monotonic(), self._cursor, len(entries)))
        self._progress_at = time.time()
        await self._sync()

    def _succeeded(self) -> None:
        self._backoff.succeeded()
        self.reachable = True

    def _rewind(self) -> None:
        """Redis may have lost what it took since the checkpoint: add it again."""
        self._sent.clear()
        self._cursor = self.spool.checkpoint

    async def _same_server(self) -> bool:
        """Ask Redis which server it is; True if it restarted since (another run id): it may
        have lost what it took, which is added again. A client may reconnect to a restarted Redis
        without an error to see (redis-py 8 does), so a failure is not the only sign."""
        checked = time.monotonic()
        run_id = str((await self.redis.info("server")).get("run_id"))
        restarted = self._run_id is not None and run_id != self._run_id
        if restarted:
            log.warning("Redis restarted: adding again what it took since the checkpoint")
            self._rewind()
        self._run_id, self._checked_at = run_id, checked
        return restarted

    def _commit_durable(self) -> None:
        """Move the checkpoint past what Redis took ``durable_seconds`` ago or earlier, and
        before the last look at which server it is (``_same_server``)."""
        old = min(time.monotonic() - self.durable_seconds, self._checked_at)
        end, count = None, 0
        while self._sent and self._sent[0][0] <= old:
            _, end, added = self._sent.popleft()
            count += added
        if end is not None:
            self.spool.commit(end)
            self.metrics.inc("records_queued", count)

    def _read(self) -> list[tuple[bytes, Position]]:
        position = self._cursor
        while True:
            entries = self.spool.read(position, FORWARD_RECORDS, FORWARD_BYTES)
            if entries:
                return entries
            ahead = self.spool.past_ended(position)
            if ahead == position:
                return []
            position = self._cursor = ahead

    async def _sync(self) -> None:
        if time.monotonic() - self._last_sync > SYNC_SECONDS:
            self._last_sync = time.monotonic()
            await asyncio.to_thread(self.spool.sync)


def consumer_name() -> str:
    """This writer's name in the group: its host and process, and a token unique to this
    run (two containers' processes may share a host name and a pid)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


class Relay:
    """A writer's side: reads the stream in the writers' group into ``spool`` (this writer's
    own slot, written by its history writer process), and acknowledges each record once the
    slot's checkpoint is past it. Reads at most ``holding`` records ahead of what is written,
    so that other writers get their share, and a writer that dies leaves little behind."""

    def __init__(
        self,
        url: str,
        spool: Spool,
        appended: Callable[[int], None],
        *,
        batch_size: int,
        claim_seconds: float,
        retry_seconds: float,
        consumer: str | None = None,
    ) -> None:
        self.redis = connect(url)
        self.spool = spool
        self.appended = appended  # told how many records went into the spool
        self.batch_size = batch_size
        self.holding = max(4 * batch_size, 2000)
        self.claim_ms = max(1, round(claim_seconds * 1000))
        self.consumer = consumer or consumer_name()
        self._backoff = Backoff("reading the queue", retry_seconds)
        # Records read and spooled, not yet acknowledged: where each ends in the spool.
        self._unacked: deque[tuple[Position, bytes]] = deque()
        self._claim_from = b"0-0"
        self._last_claim = self._last_trim = self._last_touch = 0.0
        self.acknowledged = 0

    async def run(self, stopping: asyncio.Event) -> None:
        """Read, spool and acknowledge until ``stopping`` is set."""
        trouble = _trouble()
        grouped = False
        while not stopping.is_set():
            try:
                if not grouped:
                    await self._group()
                    grouped = True
                await self._round()
            except trouble as error:
                if "NOGROUP" in str(error):  # Redis lost its data (restarted without any)
                    grouped = False
                await self._backoff.failed(error)
                continue
            except Exception:  # the spool's files (a full disk), or a bug: go on in a while
                log.exception("reading the queue failed: trying again")
                await asyncio.sleep(self._backoff.longest)
                continue
            self._backoff.succeeded()

    async def close(self) -> None:
        """Acknowledge what was written (after the history writer has stopped), and leave."""
        try:
            await self.acknowledge()
        except _trouble() as error:
            log.warning(
                "could not acknowledge the last records (%s): they will be taken over "
                "by another writer and stored once",
                type(error).__name__,
            )
        await self.redis.aclose()

    async def _group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            # From the stream's first record: gateways may have added records before any
            # writer ever ran.
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            log.info("created the consumer group %s on %s", GROUP, STREAM)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _round(self) -> None:
        await self.acknowledge()
        now = time.monotonic()
        if now - self._last_touch > self.claim_ms / 3000:
            self._last_touch = now
            await self._touch()
        if now - self._last_trim > TRIM_SECONDS:
            self._last_trim = now
            await self.trim()
        if len(self._unacked) >= self.holding or not self._room():
            await asyncio.sleep(POLL_SECONDS)  # the history writer is behind: let it write
            return
        room = min(self.batch_size, self.holding - len(self._unacked))
        if now - self._last_claim > min(self.claim_ms / 1000, 1.0):
            self._last_claim = now
            claimed = await self._claim(room)
            if claimed:
                return
        read: Any = await self.redis.xreadgroup(
            GROUP, self.consumer, {STREAM: ">"}, count=room, block=BLOCK_MS
        )
        for _, entries in read or ():  # RESP2's [[stream, entries]]
            self._spool(entries)

    def _room(self) -> bool:
        """The spool has room for a batch of large records (4 MiB) more."""
        return self.spool.pending_bytes + 4 * 2**20 < self.spool.max_bytes

    async def _claim(self, room: int) -> int:
        """Take records idle for ``claim_ms`` in another writer's hands (or a former run of
        this one): that writer died, or is stuck."""
        found = await self.redis.xautoclaim(
            STREAM, GROUP, self.consumer, self.claim_ms, self._claim_from, count=room
        )
        self._claim_from, entries = found[0], found[1]
        if entries:
            log.info("took over %d records another writer left unacknowledged", len(entries))
            self._spool(entries)
        return len(entries)

    def _spool(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        appended = 0
        for n, (entry_id, fields) in enumerate(entries):
            record = fields.get(FIELD) if fields else None
            if record is None or b"\n" in record:  # not a record of ours: kept aside, dropped
                log.error("stream entry %s holds no record: dead-lettered", entry_id)
                self.spool.dead_letter(
                    repr(fields).encode() if record is None else record,
                    f"queue entry {entry_id!r} is not a record",
                )
                self._unacked.append((self.spool.end, entry_id))
                continue
            position = self.spool.append(record)
            if position is None:
                # The spool is full: the rest stay pending in Redis, taken over later.
                log.error("spool full: %d records left in the queue for later", len(entries) - n)
                break
            self._unacked.append((position, entry_id))
            appended += 1
        if appended:
            self.appended(appended)

    async def acknowledge(self) -> None:
        """``XACK`` the records the history writer has written (its checkpoint is past)."""
        if not self._unacked:
            return
        written = self.spool.written_through()
        done = list(takewhile(lambda held: held[0] <= written, self._unacked))
        if done:
            await self.redis.xack(STREAM, GROUP, *(entry_id for _, entry_id in done))
            for _ in done:
                self._unacked.popleft()
            self.acknowledged += len(done)

    async def _touch(self) -> None:
        """Reset the idle time of the records this writer holds, so that no other writer
        takes them over while this one is alive (a slow database, a long batch)."""
        if self._unacked:
            ids: list[bytes | str | int | memoryview] = [i for _, i in self._unacked]
            await self.redis.xclaim(STREAM, GROUP, self.consumer, 0, ids, justid=True)

    async def trim(self) -> None:
        """Drop the records every group has acknowledged; forget writers long gone."""
        groups: list[dict[str, Any]] = await self.redis.xinfo_groups(STREAM)
        if GROUP.encode() not in {group["name"] for group in groups}:
            return  # the stream made again without our group (Redis lost it): keep it all
        lowest: tuple[int, int] | None = None
        for group in groups:
            summary = await self.redis.xpending(STREAM, group["name"]) if group["pending"] else {}
            if summary.get("min"):  # the oldest record read and not acknowledged
                oldest = stream_id(summary["min"])
            else:  # everything delivered is acknowledged: keep what comes after
                milliseconds, sequence = stream_id(group["last-delivered-id"])
                oldest = (milliseconds, sequence + 1)
            lowest = oldest if lowest is None else min(lowest, oldest)
        assert lowest is not None
        await self.redis.xtrim(STREAM, minid=f"{lowest[0]}-{lowest[1]}", approximate=True)
        for consumer in await self.redis.xinfo_consumers(STREAM, GROUP):
            if not consumer["pending"] and consumer["idle"] > FORGET_CONSUMERS_MS:
                # Only if it still holds nothing, in one step: it may have read meanwhile.
                await self.redis.eval(_FORGET, 1, STREAM, GROUP, consumer["name"])
