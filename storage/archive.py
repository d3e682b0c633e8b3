"""Archives: what retention, a prune or content retention removes, written first to
``MES_ARCHIVE_DIR`` as compressed JSON lines in the export's format (``storage/exports.py``),
which ``python -m gateway import`` loads back.

One file per database and day (the day the records started), named so that a person finds
a day at a glance: ``<database>-2026-11-23.jsonl.gz``. Each archiving round that reaches a
day appends one gzip member to its file: the records, then a manifest line (how many, the
first and last ids, the SHA-256 of the record lines), and is synced to disk before the rows
are removed. A member that cannot be written whole (disk full, permission denied) is cut
off again, and the removal does not happen: ``ArchiveFailed`` is raised, and the next round
tries again. A round that wrote its archive and then failed to remove leaves records that
the next round archives again; importing is idempotent, so a record twice in the archive
is stored once.
"""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Select, or_, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.browse import Rebuilder, rebuilt
from storage.dsn import parse_dsn
from storage.exports import MANIFEST, REQUEST_LOG, export_record, line, request_log_record
from storage.partitions import Partitions
from storage.schema import completions, request_logs

CHUNK = 500
KEPT_CONVERSATIONS = 5000  # a day's archive keeps this many conversations' messages read


class ArchiveFailed(Exception):
    """An archive could not be written whole: what it was to hold stays in the database."""


@dataclass(slots=True)
class Archive:
    root: Path
    database: str  # the history database's name: part of every file's name
    records: int = 0  # records this process archived

    def path(self, day: date) -> Path:
        return self.root / f"{self.database}-{day.isoformat()}.jsonl.gz"

    def member(self, day: date, reason: str) -> Member:
        return Member(self, day, reason)


class Member:
    """One round's records of one day, appended to the day's file as a gzip member of
    their own; ``commit`` adds the manifest and syncs, ``abort`` cuts the file back."""

    def __init__(self, archive: Archive, day: date, reason: str) -> None:
        self.archive, self.day, self.reason = archive, day, reason
        self.records = self.completions = self.request_logs = 0
        self.first_id: str | None = None
        self.last_id: str | None = None
        self.digest = hashlib.sha256()
        self._file: IO[bytes] | None = None
        self._gzip: gzip.GzipFile | None = None
        self._start = 0

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records (blocking: call it in a thread)."""
        try:
            if self._gzip is None:
                self._open()
            assert self._gzip is not None
            lines = []
            for record in records:
                raw = line(record)
                lines.append(raw)
                self.digest.update(raw)
                self.records += 1
                if record.get("object") == REQUEST_LOG:
                    self.request_logs += 1
                else:
                    self.completions += 1
                self.first_id = self.first_id or record["id"]
                self.last_id = record["id"]
            self._gzip.write(b"".join(lines))
        except OSError as error:
            self.abort()
            raise ArchiveFailed(f"{self.archive.path(self.day)}: {error}") from error

    def commit(self) -> None:
        """The manifest written and the file synced: the records are safe to remove."""
        if self._gzip is None:
            return  # nothing was written
        manifest = {
            "database": self.archive.database,
            "day": self.day.isoformat(),
            "reason": self.reason,
            "records": self.records,
            "completions": self.completions,
            "request_logs": self.request_logs,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "sha256": self.digest.hexdigest(),
            "written_at": datetime.now(UTC).isoformat(),
        }
        assert self._file is not None
        try:
            self._gzip.write(orjson.dumps({MANIFEST: manifest}) + b"\n")
            self._gzip.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            _partial(self.archive.path(self.day)).unlink()
            _sync_folder(self.archive.root)
        except OSError as error:
            self.abort()
            raise ArchiveFailed(f"{self.archive.path(self.day)}: {error}") from error
        self._file.close()  # and with it the lock
        self._gzip = self._file = None
        self.archive.records += self.records

    def abort(self) -> None:
        """The file as it was before this member (best effort: the disk may be full)."""
        file, compressor, self._gzip, self._file = self._file, self._gzip, None, None
        if file is None:
            return
        if compressor is not None:
            compressor.fileobj = None  # type: ignore[assignment]  # its trailer is not wanted
        try:
            file.truncate(self._start)
            file.flush()
            os.fsync(file.fileno())
            _partial(self.archive.path(self.day)).unlink(missing_ok=True)
        except OSError:
            pass  # the length kept beside the file cuts it back before the next member
        finally:
            file.close()

    def _open(self) -> None:
        self.archive.root.mkdir(parents=True, exist_ok=True)
        path = self.archive.path(self.day)
        self._file = open(path, "ab")  # noqa: SIM115 - closed in commit
        # One member at a time in a file: a prune and retention may archive one day at once.
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        # A member a process died writing would make the members after it unreadable: the
        # file's length before each member is kept beside it until the member is whole.
        partial = _partial(path)
        if partial.exists():
            self._file.truncate(int(partial.read_text() or 0))
            os.fsync(self._file.fileno())
        self._start = self._file.seek(0, os.SEEK_END)
        partial.write_text(str(self._start))
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        _sync_folder(self.archive.root)
        self._gzip = gzip.GzipFile(fileobj=self._file, mode="wb", compresslevel=6, mtime=0)


def _partial(path: Path) -> Path:
    """Where the length of ``path`` before the member being written is kept."""
    return path.with_name(path.name + ".partial")


def _sync_folder(folder: Path) -> None:
    """A new file's name synced too, not only its bytes."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def keep(
    connection: AsyncConnection,
    completion_ids: Sequence[str],
    request_log_ids: Sequence[str],
    *,
    archive: Archive,
    reason: str,
) -> None:
    """Archive these completions (rebuilt, with their conversations) and request logs, read
    in the transaction about to remove them, each in the file of its day."""
    by_day: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for start in range(0, len(completion_ids), CHUNK):
        query = select(completions).where(
            completions.c.id.in_(completion_ids[start : start + CHUNK])
        )
        for record in await _completion_records(connection, query):
            by_day[record["started_at"].date()].append(record)
    for start in range(0, len(request_log_ids), CHUNK):
        query = select(request_logs).where(
            request_logs.c.id.in_(request_log_ids[start : start + CHUNK])
        )
        for row in (await connection.execute(query)).mappings():
            by_day[row["started_at"].date()].append(request_log_record(row))
    for day, records in sorted(by_day.items()):
        records.sort(key=lambda r: (r["started_at"], r["id"]))
        member = archive.member(day, reason)
        await asyncio.to_thread(_write_whole, member, records)


def _write_whole(member: Member, records: list[dict[str, Any]]) -> None:
    member.write(records)
    member.commit()


async def keep_day(
    day: date, *, engine: AsyncEngine, partitions: Partitions, archive: Archive, reason: str
) -> tuple[int, int]:
    """Archive every row of ``day``'s partitions, a page at a time; how many completions
    and request logs were archived (``Partitions.drop_before`` drops the day only if its
    partitions still hold that many)."""
    member = archive.member(day, reason)
    rebuilder: Rebuilder | None = None  # kept from page to page: a conversation's turns
    try:  # are spread over the day, and its messages are read once, not once a page
        for name in ("completions", "request_logs"):
            if not partitions.holds(name, day):
                continue  # dropped already (a round that stopped between the two)
            table, hint = partitions.of_day(name, day)
            after: tuple[datetime, str] | None = None
            while True:
                query = select(table).order_by(table.c.started_at, table.c.id).limit(CHUNK)
                if hint is not None:
                    query = query.with_hint(table, hint, "mysql")
                if after is not None:  # a range on started_at, which its index serves
                    query = query.where(
                        table.c.started_at >= after[0],
                        or_(table.c.started_at > after[0], table.c.id > after[1]),
                    )
                async with engine.connect() as connection:
                    if name == "completions":
                        if rebuilder is None or rebuilder.loaded > KEPT_CONVERSATIONS:
                            rebuilder = Rebuilder(connection)
                        rebuilder.connection = connection
                        records = await _completion_records(connection, query, rebuilder)
                    else:
                        rows = (await connection.execute(query)).mappings().all()
                        records = [request_log_record(row) for row in rows]
                if not records:
                    break
                await asyncio.to_thread(member.write, records)
                after = (records[-1]["started_at"], records[-1]["id"])
                if len(records) < CHUNK:
                    break
        await asyncio.to_thread(member.commit)
    except BaseException:
        await asyncio.to_thread(member.abort)
        raise
    return member.completions, member.request_logs


async def _completion_records(
    connection: AsyncConnection, query: Select[Any], rebuilder: Rebuilder | None = None
) -> list[dict[str, Any]]:
    rows: list[RowMapping] = list((await connection.execute(query)).mappings())
    rebuilder = rebuilder or Rebuilder(connection)
    ids = [row["conversation_id"] for row in rows]
    await rebuilder.load(ids, with_rows=True)
    try:
        if all(rebuilder.holds(row["conversation_id"], row["response_hash"]) for row in rows):
            return [export_record(*rebuilt(rebuilder, row)) for row in rows]
    except LookupError:  # a request's message missing
        pass
    # An answer or a message stored since its conversation was read: read them again.
    rebuilder.forget()
    await rebuilder.load(ids, with_rows=True)
    return [export_record(*rebuilt(rebuilder, row)) for row in rows]


def database_name(dsn: str) -> str:
    """The name archives give a history database: its own (a SQLite file's stem)."""
    database = parse_dsn(dsn)
    name = database.database or "history"
    return Path(name).stem if database.kind == "sqlite" else name
