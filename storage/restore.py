"""Exports and archives loaded back into a history database (``python -m gateway import``).

Each line becomes the rows a captured record becomes (``storage/exports.py``) and goes
through the writer's own write (``storage.writer.write_rows``): in batches, each in one
transaction, into the day partitions if history is split by day, idempotent on record ids
(a record already stored is left as it is, so importing a file twice stores it once), and
never for an owner whose history was erased. A line that does not parse, or that the
database refuses on its own, is reported with its file and line number and skipped; the
others of its batch are written.

Files may be the export's JSON lines, its JSON array, or archives (gzip, one member per
archiving round, each ending with a manifest line whose counts and checksum are checked).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import and_, bindparam, update
from sqlalchemy.ext.asyncio import AsyncEngine

from capture.redaction import Redactor
from capture.rows import RowSet
from storage.erasures import Erased, Erasures
from storage.exports import MANIFEST, BadLine, conversation_extras, rowset_of
from storage.partitions import Partitions
from storage.schema import conversations
from storage.writer import is_unavailable, write_rows

BATCH_RECORDS = 500
BATCH_BYTES = 4 * 2**20
RETRIES = 8  # a batch the database cannot take now is tried again this often, then given up


@dataclass(slots=True)
class Tally:
    """What an import has done so far."""

    files: int = 0
    lines: int = 0
    bytes: int = 0
    stored: int = 0  # records written
    present: int = 0  # records stored already (same id): left as they were
    erased: int = 0  # records of owners whose history was erased: dropped
    skipped: int = 0  # lines that are no record, or that the database refused
    manifests: int = 0  # archive manifests whose counts and checksum matched
    mismatched: int = 0  # archive manifests that did not match the lines before them
    damaged: int = 0  # files that end before their compressed data does
    problems: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def records(self) -> int:
        return self.stored + self.present + self.erased

    def rate(self) -> float:
        return self.records / max(time.monotonic() - self.started, 1e-9)


@dataclass(slots=True)
class _Line:
    where: str  # file:line
    rowset: RowSet
    extras: tuple[str, str | None, str | None] | None
    size: int


class Importer:
    def __init__(
        self,
        engine: AsyncEngine,
        partitions: Partitions | None = None,
        redactor: Redactor | None = None,
        *,
        report: Callable[[Tally], None] | None = None,
        batch_records: int = BATCH_RECORDS,
    ) -> None:
        self.engine = engine
        self.partitions = partitions
        self.redactor = redactor or Redactor(())
        self.erasures = Erasures()
        self.report = report
        self.batch_records = batch_records
        self.tally = Tally()

    async def load(self, paths: Sequence[Path]) -> Tally:
        """Import every file in ``paths``, in order; the tally of what was done."""
        for path in paths:
            await self._load_file(path)
        return self.tally

    async def _load_file(self, path: Path) -> None:
        tally = self.tally
        tally.files += 1
        batch: list[_Line] = []
        size = 0
        checked = _Manifests(str(path), tally)
        lines = _lines(path)
        while True:
            try:
                number, raw = next(lines)
            except StopIteration:
                break
            except BadArchive as error:
                self.tally.damaged += 1
                self.tally.problems.append(f"{error}: the lines before were imported")
                break
            tally.lines += 1
            tally.bytes += len(raw)
            text = raw.strip()
            if text.endswith(b","):  # the export's JSON array: a record a line
                text = text[:-1]
            if text in (b"", b"[", b"]"):
                continue
            where = f"{path}:{number}"
            try:
                record = orjson.loads(text)
                if isinstance(record, dict) and MANIFEST in record:
                    checked.close(record[MANIFEST], where)
                    continue
                checked.add(raw)
                rowset = self.redactor.rows(rowset_of(record))
            except (orjson.JSONDecodeError, BadLine) as error:
                self._skip(where, str(error))
                continue
            batch.append(_Line(where, rowset, conversation_extras(record), len(raw)))
            size += len(raw)
            if len(batch) >= self.batch_records or size >= BATCH_BYTES:
                await self._write(batch)
                batch, size = [], 0
            await asyncio.sleep(0)
        if batch:
            await self._write(batch)
        checked.finish()

    def _skip(self, where: str, reason: str) -> None:
        self.tally.skipped += 1
        self.tally.problems.append(f"{where}: skipped: {reason}")

    async def _write(self, batch: list[_Line]) -> None:
        try:
            await self._write_kept(batch)
        except Exception as error:
            if is_unavailable(error):
                raise
            for line in batch:  # refused: find which line, write the others
                try:
                    await self._write_kept([line])
                except Exception as refused:
                    if is_unavailable(refused):
                        raise
                    self._skip(line.where, f"refused: {type(refused).__name__}: {refused}")
        if self.report is not None:
            self.report(self.tally)

    async def _write_kept(self, batch: list[_Line]) -> None:
        while True:
            kept = [line for line in batch if not self.erasures.holds(line.rowset)]
            self.tally.erased += len(batch) - len(kept)
            if not kept:
                return
            try:
                new = await self._until_through([line.rowset for line in kept])
            except Erased:
                batch = kept
                continue
            self.tally.stored += new
            self.tally.present += len(kept) - new
            await self._conversation_extras([line.extras for line in kept if line.extras])
            return

    async def _until_through(self, rowsets: list[RowSet]) -> int:
        delay = 0.25
        for attempt in range(RETRIES):
            try:
                return await write_rows(self.engine, rowsets, self.partitions, self.erasures)
            except Exception as error:
                if not is_unavailable(error) or attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    async def _conversation_extras(self, extras: list[tuple[str, str | None, str | None]]) -> None:
        """Conversations' metadata and tags, where those stored have none (an admin's,
        set after capture, are not part of the rows a record becomes)."""
        if not extras:
            return
        c = conversations.c
        statement = (
            update(conversations)
            .where(and_(c.id == bindparam("b_id"), c.metadata.is_(None), c.tags.is_(None)))
            .values(metadata=bindparam("b_metadata"), tags=bindparam("b_tags"))
        )
        async with self.engine.begin() as connection:
            await connection.execute(
                statement,
                [{"b_id": i, "b_metadata": m, "b_tags": t} for i, m, t in sorted(set(extras))],
            )


class _Manifests:
    """An archive's manifest lines checked against the record lines before each: their
    count and the SHA-256 of their bytes."""

    def __init__(self, path: str, tally: Tally) -> None:
        self.path, self.tally = path, tally
        self.count, self.digest = 0, hashlib.sha256()
        self.seen = False

    def add(self, raw: bytes) -> None:
        self.count += 1
        self.digest.update(raw)

    def close(self, manifest: Any, where: str) -> None:
        self.seen = True
        expected = manifest.get("records") if isinstance(manifest, dict) else None
        checksum = manifest.get("sha256") if isinstance(manifest, dict) else None
        if expected == self.count and checksum == self.digest.hexdigest():
            self.tally.manifests += 1
        else:
            self.tally.mismatched += 1
            self.tally.problems.append(
                f"{where}: the manifest says {expected} records (sha256 {checksum}); "
                f"the lines before it are {self.count} (sha256 {self.digest.hexdigest()})"
            )
        self.count, self.digest = 0, hashlib.sha256()

    def finish(self) -> None:
        if self.seen and self.count:
            self.tally.problems.append(
                f"{self.path}: {self.count} record lines after the last manifest (an "
                "archive cut short?): imported, unchecked"
            )


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``path``'s lines, numbered from 1; gzip (of any number of members) read through."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        file: IO[bytes] = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw  # type: ignore[assignment]
        try:
            yield from enumerate(file, 1)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise BadArchive(f"{path}: {error or type(error).__name__}") from None


class BadArchive(Exception):
    """A compressed file that ends before its data does, or is no gzip at all."""
