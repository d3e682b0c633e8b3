"""The history writer: one task per database, fed by a bounded queue, writing in batches.

The request path calls ``submit()``, which never waits: a full queue counts the record as
dropped and logs it. The writer takes what is queued (up to ``batch_size``, waiting at most
``flush_interval`` for a batch to fill), builds the rows, and writes them in one transaction.

Retry policy: a transient failure (the connection refused, dropped or timed out, a deadlock,
a unique key raced by another writer) is retried with jittered exponential backoff for up to
``retry_seconds``; then the batch is counted as failed and logged. A permanent failure (a row
the database refuses) is retried record by record, so one bad record does not sink the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    stop_any,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from gateway.metrics import Metrics
from storage.batch import write_batch
from storage.rows import Record, RowSet

log = logging.getLogger("mes.writer")


def is_unavailable(error: BaseException) -> bool:
    """The database is down, unreachable or busy: the same batch may go through later."""
    if isinstance(error, (OperationalError, InterfaceError, OSError)):
        return True
    if isinstance(error, DBAPIError):
        return error.connection_invalidated or "deadlock" in str(error).lower()
    return False


def is_transient(error: BaseException) -> bool:
    """Worth retrying; a unique key raced by another writer is, a few times."""
    return is_unavailable(error) or isinstance(error, IntegrityError)


class HistoryWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: Metrics,
        *,
        queue_size: int,
        batch_size: int,
        flush_interval: float,
        retry_seconds: float,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.queue: asyncio.Queue[Record] = asyncio.Queue(queue_size)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_seconds = retry_seconds
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, record: Record) -> bool:
        """Queue ``record`` without waiting; False (counted and logged) when the queue is full."""
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.metrics.inc("records_dropped")
            log.error("capture queue full (%d): record %s not captured", self.depth, record.id)
            return False
        self.metrics.inc("records_captured")
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mes-history-writer")

    async def close(self, grace: float) -> None:
        """Write what is queued, waiting at most ``grace`` seconds; then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self.queue.join(), grace)
        except TimeoutError:
            log.error("shutdown grace over: %d records left unwritten", self.depth)
            self.metrics.inc("records_failed", self.depth)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._write(batch)
            except Exception:  # the writer must outlive any one batch; counted and logged
                log.exception("history writer failed on a batch of %d", len(batch))
                self.metrics.inc("records_failed", len(batch))
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _next_batch(self) -> list[Record]:
        batch = [await self.queue.get()]
        self._drain_into(batch)
        if len(batch) < self.batch_size:
            await asyncio.sleep(self.flush_interval)
            self._drain_into(batch)
        return batch

    def _drain_into(self, batch: list[Record]) -> None:
        while len(batch) < self.batch_size:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _write(self, batch: Sequence[Record]) -> None:
        rowsets: list[tuple[Record, RowSet]] = []
        for record in batch:
            try:
                rowsets.append((record, record.rows()))
            except Exception:  # a record we cannot shape is a bug: keep the rest, say which
                log.exception("could not build rows for record %s", record.id)
                self.metrics.inc("records_failed")
        if not rowsets:
            return
        try:
            await self._write_with_retry([rows for _, rows in rowsets])
        except Exception as error:
            if is_unavailable(error) or len(rowsets) == 1:
                log.error(
                    "giving up on %d records (%s): %s", len(rowsets), type(error).__name__, error
                )
                self.metrics.inc("records_failed", len(rowsets))
                return
            for record, rows in rowsets:
                await self._write_one(record, rows)
            return
        self.metrics.inc("records_written", len(rowsets))

    async def _write_one(self, record: Record, rows: RowSet) -> None:
        try:
            await self._write_with_retry([rows])
        except Exception as error:
            log.error("record %s refused (%s): %s", record.id, type(error).__name__, error)
            self.metrics.inc("records_failed")
            return
        self.metrics.inc("records_written")

    async def _write_with_retry(self, rowsets: list[RowSet]) -> None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_any(
                stop_after_delay(self.retry_seconds), _StopAfterRepeatedIntegrityErrors()
            ),
            wait=wait_exponential_jitter(initial=0.05, max=2.0),
            reraise=True,
        ):
            with attempt:
                async with self.engine.begin() as connection:
                    await write_batch(connection, rowsets)


class _StopAfterRepeatedIntegrityErrors(stop_base):
    """A key race resolves on the next try; the same constraint broken thrice is for good."""

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome else None
        return isinstance(error, IntegrityError) and retry_state.attempt_number >= 3
