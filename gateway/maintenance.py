"""Scheduled maintenance of the history database: retention, by one replica at a time.

Every ``MES_MAINTENANCE_INTERVAL`` seconds (and once as soon as the history database is
ready), the process that gets the database's ``mes-maintenance`` lock (see
``storage/locks.py``) makes the partitions of today and tomorrow (``MES_DAILY_PARTITION``),
removes history older than ``MES_RETENTION_DAYS`` and drops content older than
``MES_CONTENT_RETENTION_DAYS``; the others find the lock taken and skip their turn.
What was removed is counted in ``/metrics`` and written to the audit log. With
``MES_ARCHIVE_DIR``, it is written to an archive first (``storage/archive.py``); a round
whose archive cannot be written removes nothing more, and says so in ``/readyz`` and
``/metrics`` until one can.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.metrics import Metrics
from gateway.settings import Settings
from storage import accounts, retention
from storage.archive import Archive, ArchiveFailed, database_name
from storage.locks import named_lock
from storage.partitions import Partitions

log = logging.getLogger("mes.maintenance")

ACTOR = "retention"
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Maintenance:
    def __init__(
        self,
        settings: Settings,
        history: AsyncEngine,
        main: AsyncEngine,
        metrics: Metrics,
        partitions: Partitions | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.partitions = partitions
        self.history, self.main = history, main
        self.metrics = metrics
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self.archive = (
            Archive(Path(settings.archive_dir), database_name(settings.history_dsn))
            if settings.archive_dir
            else None
        )
        # Why the last removal could not be archived, and since when (None: it could).
        self.archive_failing: tuple[datetime, str] | None = None
        if self.archive is not None:
            metrics.gauges["archive_failing"] = lambda: float(self.archive_failing is not None)

    async def archived(self, removal: Awaitable[T]) -> T:
        """``removal`` (a prune or content drop that archives first), its archive's records
        counted, and a failure to write the archive recorded for ``/readyz`` and
        ``/metrics`` (then raised: nothing more is removed this round)."""
        before = self.archive.records if self.archive is not None else 0
        try:
            done = await removal
        except ArchiveFailed as error:
            self.metrics.inc("archive_failures")
            if self.archive_failing is None:
                self.archive_failing = (utcnow(), str(error))
            log.error("archive could not be written, nothing more removed: %s", error)
            raise
        finally:
            if self.archive is not None:
                self.metrics.inc("archive_records", self.archive.records - before)
        self.archive_failing = None
        return done

    @property
    def needed(self) -> bool:
        settings = self.settings
        return bool(
            settings.mes_retention_days or settings.content_retention_days or self.partitions
        )

    def start(self, ready: Callable[[], Awaitable[object]]) -> None:
        """Run on schedule once ``ready()`` (the history database is set up) returns."""
        self._task = asyncio.create_task(self._run(ready), name="mes-maintenance")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self, ready: Callable[[], Awaitable[object]]) -> None:
        await ready()
        while True:
            try:
                if self.partitions is None:  # split by an earlier start: days stay days
                    found = Partitions(self.history)
                    if await found.in_use():
                        self.partitions = found
                if not self.needed:
                    return
                await self.run_once()
            except Exception:  # the database may be down: next interval tries again
                log.exception("maintenance failed; next try in %.0f s", self.interval)
                self.metrics.inc("maintenance_failures")
            await asyncio.sleep(self.interval)

    @property
    def interval(self) -> float:
        return self.settings.maintenance_interval

    async def run_once(self) -> bool:
        """One round, if no other process is running one; False when one was."""
        async with named_lock(self.history, "mes-maintenance", wait=False) as held:
            if not held:
                log.debug("maintenance: another process holds the lock")
                return False
            now = self.clock()
            step = self.settings.retention_step
            if self.partitions is not None:
                today = now.date()
                await self.partitions.ensure([today, today + timedelta(days=1)])
            if days := self.settings.mes_retention_days:
                cutoff = now - timedelta(days=days)
                if self.partitions is not None:  # whole days: a day goes when all of it is old
                    cutoff = datetime.combine(cutoff.date(), time())
                run = await self.archived(
                    retention.prune(self.history, cutoff, step, self.partitions, self.archive)
                )
                self.metrics.inc("retention_completions_deleted", run.deleted.completions)
                self.metrics.inc("retention_request_logs_deleted", run.deleted.request_logs)
                self.metrics.inc("retention_days_dropped", run.days_dropped)
                if run.deleted:
                    counts = asdict(run.deleted)
                    log.info(
                        "retention: removed history older than %d days %s, %d whole days, "
                        "in %d steps (longest %.0f ms)",
                        days,
                        counts,
                        run.days_dropped,
                        run.steps,
                        run.longest_step * 1000,
                    )
                    await self._audit("history.pruned", {"older_than_days": days, **counts})
            if days := self.settings.content_retention_days:
                run = await self.archived(
                    retention.drop_content(
                        self.history, now - timedelta(days=days), step, self.archive
                    )
                )
                self.metrics.inc("retention_contents_dropped", run.contents_dropped)
                if run.contents_dropped:
                    log.info(
                        "retention: dropped the content of %d messages older than %d days",
                        run.contents_dropped,
                        days,
                    )
                    await self._audit(
                        "history.content_dropped",
                        {"older_than_days": days, "messages": run.contents_dropped},
                    )
            return True

    async def _audit(self, action: str, details: dict[str, int]) -> None:
        async with self.main.begin() as connection:
            await accounts.audit(connection, ACTOR, action, None, details)
