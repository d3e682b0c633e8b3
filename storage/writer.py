"""The history writer: fed by the durable spool, writing in batches.

The request path calls ``spool_record()``, which never waits on the database: it appends
the record to the spool (``storage/spool.py``). The writer reads records back in spool order, up
to ``batch_size`` or whatever arrived within ``flush_interval``, builds their rows and writes
them in one transaction; then it moves the spool's checkpoint past them. A gateway runs its
writer in a process of its own (``storage/writer_process.py``), following the spool slot
the gateway appends to, so that building and writing rows never takes the request path's
event loop.

Retry policy: while the database is unreachable, down or timing out, the same batch is
retried with jittered exponential backoff (at most ``retry_seconds`` between attempts),
for as long as it takes: nothing is dropped, the spool holds what arrives meanwhile. A
batch the database refuses for another reason (a constraint broken, a value too long) is
written record by record; a record refused on its own goes to the dead-letter file and the
writer moves on. Writes are idempotent on the record id, so a record written twice (after
a crash between commit and checkpoint) is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import date
from pathlib import Path
from typing import Protocol

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from capture.redaction import Redactor
from capture.rows import Record, RowSet
from storage.batch import StaleRowType, write_batch
from storage.database import SchemaOutdated
from storage.erasures import Erased, Erasures
from storage.partitions import Partitions
from storage.prices import Pricer, Prices
from storage.schema import DAILY
from storage.spool import Position, Spool
from storage.telemetry import SpanExport

log = logging.getLogger("mes.writer")


class Counter(Protocol):
    """Where the writer counts what it does (records written, dead-lettered, retries, ...):
    the gateway's metrics, or the shared memory a writer process reports through."""

    def inc(self, name: str, amount: int = 1) -> None: ...

    def add_costs(self, costs: Mapping[str, float]) -> None:
        """Dollars spent, by model, on the records just written."""
        ...

    def observe_batch(self, seconds: float) -> None:
        """A batch written, in ``seconds`` from its first try to its commit."""
        ...


Decode = Callable[[bytes], Record]
Encode = Callable[[Record], bytes]
SYNC_SECONDS = 1.0
POLL_SECONDS = 0.02  # how often a writer following another process's spool looks for records
# A batch's bytes, at most: 200 records of a few KB fit; of 200 KB prompts (long agent
# contexts), five, and the writer holds a few MiB of them rather than tens.
BATCH_BYTES = 2**20
STEP_RECORDS = 5  # records read or shaped between two turns of the batch being written
BEHIND_SECONDS = 1.0  # this long reading only full batches: behind


# SQLSTATE classes and codes that say "not now" rather than "never": connection trouble,
# the server shutting down or starting up, out of resources, a serialization failure or a
# deadlock. MySQL/MariaDB client and server error numbers that say the same.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58", "40")
_TRANSIENT_MYSQL_ERRORS = frozenset(
    {
        1040,
        1053,
        1077,
        1078,
        1079,
        1080,
        1152,
        1153,
        1154,
        1155,
        1156,
        1157,
        1158,
        1159,
        1160,
        1161,
        1205,
        1213,
        1927,
        2002,
        2003,
        2005,
        2006,
        2013,
        2055,
    }
)


def _reason(error: Exception) -> str:
    """Why the database could not be set up, for the log: a schema to migrate says how; any
    other error its type (its text may hold a DSN)."""
    return str(error) if isinstance(error, SchemaOutdated) else type(error).__name__


def is_unavailable(error: BaseException) -> bool:
    """The database is down, unreachable, shutting down or busy: the same batch may go
    through later. Anything else (a constraint, a value too long) would fail again."""
    if isinstance(error, (OperationalError, InterfaceError, OSError, TimeoutError)):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    original = error.orig
    state = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    if isinstance(state, str) and state[:2] in _TRANSIENT_SQLSTATE_CLASSES:
        return True
    code = original.args[0] if original is not None and original.args else None
    return isinstance(code, int) and code in _TRANSIENT_MYSQL_ERRORS


async def until_prepared(prepare: Callable[[], Awaitable[None]], retry_seconds: float) -> None:
    """Run ``prepare`` (create and migrate the history database) until it succeeds."""
    delay = 0.5
    while True:
        try:
            await prepare()
            return
        except Exception as error:  # down, unreachable, or refusing: wait and retry
            log.warning("history database not ready (%s): retrying", _reason(error))
            await asyncio.sleep(delay)
            delay = min(retry_seconds, delay * 2)


def spool_record(spool: Spool, metrics: Counter, encode: Encode, record: Record) -> bool:
    """Append ``record`` to ``spool``; False (counted and logged) when it cannot be."""
    try:
        entry = encode(record)
    except Exception:  # a record that cannot be journaled is a bug: say which, go on
        log.exception("could not spool record %s", record.id)
        metrics.inc("records_dropped")
        return False
    try:
        position = spool.append(entry)
    except OSError as error:  # the disk: the answer still goes to its client
        metrics.inc("records_dropped")
        log.error("could not spool record %s (%s): not captured", record.id, error)
        return False
    if position is None:
        metrics.inc("records_dropped")
        log.error("spool full (%d bytes): record %s not captured", spool.max_bytes, record.id)
        return False
    metrics.inc("records_captured")
    return True


class HistoryWriter:
    """Writes what is spooled in the slot ``spool`` follows (``Spool.follow``): another
    process, the gateway, appends to it."""

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: Counter,
        spool: Spool,
        *,
        encode: Encode,
        decode: Decode,
        batch_size: int,
        flush_interval: float,
        retry_seconds: float,
        prepare: Callable[[], Awaitable[None]] | None = None,
        redactor: Redactor | None = None,
        pricer: Pricer | None = None,
        partitions: Partitions | None = None,
        stalled_since: float | None = None,
        replayed_until: Position | None = None,
        spans: SpanExport | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.spool = spool
        self.encode, self.decode = encode, decode
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_seconds = retry_seconds
        self.prepare = prepare
        self.redactor = redactor or Redactor(())
        self.pricer = pricer or Pricer(Prices(), {})
        self.partitions = partitions
        self.erasures = Erasures()
        self.spans = spans  # OpenTelemetry export of what is stored (storage/telemetry.py)
        self.ready = prepare is None
        self._cursor = spool.checkpoint  # written up to here
        self._taken = spool.checkpoint  # taken into a batch up to here
        # Records before here were spooled before this writer: replayed, in its counts.
        self._replaying = spool.end if replayed_until is None else replayed_until
        self._writing: tuple[asyncio.Task[None], Position] | None = None  # a write, its end
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self.ready_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_sync = time.monotonic()
        self._gather_until = 0.0  # keeping up: the next batch is not taken before then
        self._closing = asyncio.Event()
        self._caught_up_at = time.monotonic()  # when a batch last took all the spool held
        # When the checkpoint last moved, or nothing waited; a writer that takes over from one
        # that died stalled (a record that kills it, say) goes on counting from then.
        self._progress_at = stalled_since or time.time()

    def wake(self) -> None:
        """There are records to write."""
        self._busy()
        self._wake.set()

    def _busy(self) -> None:
        """Not idle any more: a stall is counted from now, not from the last write."""
        if self._idle.is_set():
            self._progress_at = time.time()
            self._idle.clear()

    @property
    def stalled_since(self) -> float | None:
        """When (``time.time()``) the writer last wrote, while it has records it has not
        written: the database refusing them as unavailable, a lock that never comes, a
        database not set up yet. None while it keeps up."""
        return None if self._idle.is_set() else self._progress_at

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mes-history-writer")

    async def close(self, grace: float) -> None:
        """Write what is spooled, for at most ``grace`` seconds; what is left stays spooled."""
        if self._task is None:
            return
        deadline = time.monotonic() + grace
        self._closing.set()  # no batch gathers any more
        # Idle is only news once the loop has looked again: a writer following another
        # process's slot was idle before that process appended its last records.
        while self._cursor < self.spool.end:
            self.wake()
            try:
                await asyncio.wait_for(self._idle.wait(), deadline - time.monotonic())
            except TimeoutError:
                log.warning(
                    "shutdown grace over: %d bytes of records stay in the spool for next start",
                    self.spool.pending_bytes,
                )
                break
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.spool.close()

    async def _run(self) -> None:
        if self.prepare is not None:
            await self._until_ready()
        self.ready_event.set()
        try:
            while True:
                try:
                    await self._loop()
                except Exception:
                    # Not the database, whose trouble ``_write`` outlasts, but the spool's own
                    # files (a full disk, say). Start again from the checkpoint in a while:
                    # what was taken since is read again, and writes are idempotent.
                    log.exception(
                        "history writer failed: reading the spool again from its checkpoint "
                        "in %.0f s",
                        self.retry_seconds,
                    )
                    self._busy()  # not idle: records wait, and /readyz counts the stall
                    await self._abandon_write()
                    self._taken = self._cursor
                    await asyncio.sleep(self.retry_seconds)
        finally:
            await self._abandon_write()  # stopped: what it was writing stays spooled

    async def _abandon_write(self) -> None:
        if self._writing is not None:
            task = self._writing[0]
            self._writing = None
            if not task.done():
                task.cancel()
                await asyncio.wait([task])

    async def _loop(self) -> None:
        while True:
            await self._gather()
            batch = await self._next_batch()
            if not batch:
                if self._writing is not None:
                    await self._written()
                    continue
                self._commit(self._taken)  # past what was dead-lettered, if anything
                self._idle.set()
                self._progress_at = time.time()
                await self._sync_now()
                self._wake.clear()
                if self._taken >= self.spool.end:
                    await self._wait_for_records()
                continue
            self._busy()
            # Behind, this batch's rows are built while the one before is being written
            # (see ``_rows``); keeping up, the write before begins once they are built.
            rowsets = await self._rows(batch)
            if self._writing is not None:
                await self._written()
            task = asyncio.create_task(self._write(rowsets, len(batch)), name="mes-write")
            self._writing = (task, batch[-1][0])

    async def _written(self) -> None:
        """Wait for the batch being written, then move the spool's checkpoint past it."""
        assert self._writing is not None
        task, end = self._writing
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            raise
        self._writing = None
        self._commit(end)
        if time.monotonic() - self._last_sync > SYNC_SECONDS:
            await self._sync_now()

    def _commit(self, position: Position) -> None:
        if position > self._cursor:
            self._progress_at = time.time()
            self._cursor = position
            self.spool.commit(position)

    async def _until_ready(self) -> None:
        """Create and migrate the database before the first write, as long as it takes."""
        assert self.prepare is not None
        await until_prepared(self.prepare, self.retry_seconds)
        self.ready = True

    async def _wait_for_records(self) -> None:
        """Look at the slot now and then (another process appends to it), for at most
        ``SYNC_SECONDS``; found records get ``flush_interval`` to gather into a batch."""
        for _ in range(round(SYNC_SECONDS / POLL_SECONDS)):
            if self._taken < self.spool.end or self._wake.is_set():
                break
            await asyncio.sleep(POLL_SECONDS)
        if self._taken < self.spool.end:
            self._wake.set()
        if self._wake.is_set():  # let a batch gather (``_gather``)
            self._gather_until = time.monotonic() + self.flush_interval

    async def _sync_now(self) -> None:
        self._last_sync = time.monotonic()
        await asyncio.to_thread(self.spool.sync)

    async def _gather(self) -> None:
        """Let a batch gather: after an idle spell, ``flush_interval`` from the first record
        found; keeping up (the last batch took all there was), ``flush_interval`` from the
        last batch, while that one is written. Taken as soon as the write before ended,
        batches under a steady load held only what arrived during one write, a few records,
        and a batch's statements, round trips and commit then cost each record several
        times what they do in a full batch (the README's Performance section). Behind,
        batches are full and nothing waits; closing, nothing waits."""
        wait = self._gather_until - time.monotonic()
        if wait > 0 and not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), wait)

    async def _next_batch(self) -> list[tuple[Position, Record]]:
        """The next records in spool order, read back from the spool (from the page cache,
        as a rule): at most ``batch_size`` records and about ``BATCH_BYTES`` of them, since
        a batch of large prompts is held several times over (its spooled lines, its
        records, its rows), and one is built while one is written. Behind, the batch being
        written takes a turn every ``STEP_RECORDS`` records, as in ``_rows``."""
        batch: list[tuple[Position, Record]] = []
        size = 0  # bytes of the batch's spool entries
        position = self._taken
        while len(batch) < self.batch_size and size < BATCH_BYTES:
            entries = self.spool.read(position, self.batch_size - len(batch), BATCH_BYTES - size)
            if not entries:
                ahead = self.spool.past_ended(position)
                if ahead == position:
                    break
                position = ahead  # a new segment, empty yet: nothing more was left behind
                continue
            behind = self._behind()
            for n, (entry, end) in enumerate(entries, 1):
                if behind and n % STEP_RECORDS == 0:
                    await asyncio.sleep(0)
                size += len(entry)
                position = end
                try:
                    batch.append((end, self.decode(entry)))
                except Exception as error:  # unreadable: keep it where an admin can see it
                    log.error("unreadable spooled record (%s): dead-lettered", error)
                    self.spool.dead_letter(entry, f"unreadable: {error}")
                    self.metrics.inc("records_dead_lettered")
                    continue
                if end <= self._replaying:
                    self.metrics.inc("records_replayed")
        self._taken = position
        if len(batch) < self.batch_size and size < BATCH_BYTES:
            self._caught_up_at = time.monotonic()  # took all there was: not behind
            if batch:
                self._gather_until = self._caught_up_at + self.flush_interval
        return batch

    def _behind(self) -> bool:
        return time.monotonic() - self._caught_up_at > BEHIND_SECONDS

    async def _rows(self, batch: list[tuple[Position, Record]]) -> list[tuple[Record, RowSet]]:
        """Each record's rows. Reading a batch back and shaping it cost the writer about as
        much CPU as writing one. Behind (a backlog: only full batches read for
        ``BEHIND_SECONDS``), both yield every ``STEP_RECORDS`` records, so the batch being
        written sends its next statement as soon as the database answers the last, and
        the database works while this process does (more records/s in ``bench/writer.py``).
        Keeping up, they do not: the writer and the database then take turns
        and leave the other core to the requests, and the batches gather (``_gather``),
        fewer and larger (two batches written at once, tried for the same end, cost
        requests/s for that reason)."""
        behind = self._behind()
        rowsets: list[tuple[Record, RowSet]] = []
        for n, (_, record) in enumerate(batch, 1):
            if behind and n % STEP_RECORDS == 0:
                await asyncio.sleep(0)
            try:
                rowsets.append((record, self.pricer.rows(self.redactor.rows(record.rows()))))
            except Exception as error:  # a record we cannot shape is a bug: keep it aside
                log.exception("could not build rows for record %s", record.id)
                self._dead_letter(record, f"rows: {type(error).__name__}: {error}")
        return rowsets

    async def _write(self, rowsets: list[tuple[Record, RowSet]], size: int) -> None:
        """Write a batch's rows; the writer outlives any one batch (counted and logged)."""
        try:
            began = time.monotonic()
            try:
                rowsets = await self._write_unless_erased(rowsets)
            except Exception:  # refused for good: find which record, write the others
                for record, rows in rowsets:
                    await self._write_one(record, rows)
                return
            if not rowsets:
                return
            self.metrics.observe_batch(time.monotonic() - began)
            self.metrics.inc("records_written", len(rowsets))
            self._stored(rowsets)
        except Exception:
            log.exception("history writer failed on a batch of %d", size)
            self.metrics.inc("records_failed", size)

    async def _write_one(self, record: Record, rows: RowSet) -> None:
        try:
            written = await self._write_unless_erased([(record, rows)])
        except Exception as error:
            log.error("record %s refused (%s): %s", record.id, type(error).__name__, error)
            self._dead_letter(record, f"{type(error).__name__}: {error}")
            return
        if written:
            self.metrics.inc("records_written")
            self._stored(written)

    def _stored(self, rowsets: list[tuple[Record, RowSet]]) -> None:
        """What follows a record's write: its cost counted, its span exported (if on)."""
        self._count_costs([rows for _, rows in rowsets])
        if self.spans is not None:
            self.spans.add(rowsets)

    async def _write_unless_erased(
        self, rowsets: list[tuple[Record, RowSet]]
    ) -> list[tuple[Record, RowSet]]:
        """Write ``rowsets`` but the records of erased owners, which are dropped (counted);
        the ones written (``storage/erasures.py``)."""
        while True:
            kept = [(record, rows) for record, rows in rowsets if not self.erasures.holds(rows)]
            if len(kept) < len(rowsets):
                self.metrics.inc("records_erased", len(rowsets) - len(kept))
                log.info("dropped %d record(s) of erased owners", len(rowsets) - len(kept))
            if not kept:
                return kept
            try:
                await self._write_until_through([rows for _, rows in kept])
            except Erased:  # an owner erased meanwhile: ``erasures`` knows it now
                rowsets = kept
                continue
            return kept

    def _count_costs(self, rowsets: list[RowSet]) -> None:
        costs: dict[str, float] = {}
        for rowset in rowsets:
            row = rowset.completion
            if row is not None and row["cost_usd"] is not None:
                model = row["response_model"] or row["requested_model"] or ""
                costs[model] = costs.get(model, 0.0) + row["cost_usd"]
        if costs:
            self.metrics.add_costs(costs)

    def _dead_letter(self, record: Record, reason: str) -> None:
        try:
            self.spool.dead_letter(self.encode(record), reason[:2000])
        except Exception:
            log.exception("could not dead-letter record %s", record.id)
        self.metrics.inc("records_dead_lettered")

    async def _write_until_through(self, rowsets: list[RowSet]) -> None:
        """Retry while the database is unavailable (forever); a refusal three times over
        (an integrity error that is not a race, a row type that is not stale) is raised."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(lambda e: is_unavailable(e) or isinstance(e, _REFUSALS)),
            stop=_StopOnRepeatedRefusal(),
            wait=wait_exponential_jitter(multiplier=0.05, max=self.retry_seconds),
            before_sleep=self._count_retry,
            reraise=True,
        ):
            with attempt:
                await write_rows(self.engine, rowsets, self.partitions, self.erasures)

    def _count_retry(self, state: RetryCallState) -> None:
        self.metrics.inc("write_retries")
        if state.attempt_number in (1, 10) or state.attempt_number % 100 == 0:
            outcome = state.outcome
            error = outcome.exception() if outcome else None
            log.warning(
                "history database write failed (%s), attempt %d: retrying",
                type(error).__name__,
                state.attempt_number,
            )


async def write_rows(
    engine: AsyncEngine,
    rowsets: list[RowSet],
    partitions: Partitions | None,
    erasures: Erasures,
) -> int:
    """Write ``rowsets`` in one transaction, into their days' partitions if split by day;
    how many records were new. Raises ``Erased`` (nothing written) if one of their owners
    was erased meanwhile."""
    day_table = None
    if partitions is not None:
        await partitions.ensure(_days(rowsets))
        day_table = partitions.day_table
    async with engine.begin() as connection:
        written = await write_batch(connection, rowsets, day_table)
        await erasures.check(connection, rowsets)
    return written


def _days(rowsets: list[RowSet]) -> set[date]:
    """The days the rows of a batch fall on: each needs its partitions."""
    return {
        row["started_at"].date()
        for rowset in rowsets
        for table in DAILY
        for row in rowset.tables.get(table.name, ())
    }


# Refusals that may not recur: a race between writers inserting the same key, a row type
# learnt before a migration. Retried; the third in a row is taken as meant.
_REFUSALS = (IntegrityError, StaleRowType)


class _StopOnRepeatedRefusal(stop_after_attempt):
    """Never stop while the database is unavailable; stop after three refusals."""

    def __init__(self) -> None:
        super().__init__(3)

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome else None
        return isinstance(error, _REFUSALS) and super().__call__(retry_state)


async def adopt(
    slot: Path, spool: Spool, metrics: Counter, appended: Callable[[int], None]
) -> None:
    """Move the records of a dead process's spool slot into ``spool``, where its writer takes
    them (a process that is gone, or a slot left over from more workers); ``appended`` is
    told how many."""
    other = Spool(spool.root, max_bytes=2**62)
    if not await asyncio.to_thread(other.take, slot):
        return  # another process got there first
    moved = 0
    try:
        while entries := other.read(other.checkpoint, 500):
            for entry, _ in entries:
                if spool.append(entry) is None:
                    log.error("spool full: %s keeps its remaining records for later", slot)
                    return
                moved += 1
                appended(1)
            other.commit(entries[-1][1])
            await asyncio.sleep(0)
        other.clear()
    finally:
        other.close()
        if moved:
            log.info("took over %d spooled records from %s", moved, slot)
            metrics.inc("records_adopted", moved)
