"""The durable spool: an append-only journal of captured records on local disk.

Every record the gateway accepts is appended here before its client gets the last byte
of its answer; the history writer reads the journal in order, writes to the database, and
then moves a checkpoint past what it wrote. What lies past the checkpoint, after a
database outage, a SIGTERM or a ``kill -9``, is written on the next start (writes are
idempotent on the record's id, so what is written twice is stored once).

Layout, under the spool directory::

    slot-0/lock                      held (flock) by the process that owns the slot
    slot-0/segment-000000000001.log  records, one JSON line each
    slot-0/checkpoint                "<segment> <offset>": everything before is written
    dead-letter.jsonl                records a database refused for good

Each gateway process takes the first free slot; a slot whose process died is free again
(the kernel drops the lock), so its records are picked up by the next process to start.
The request path only appends (a ``write`` into the page cache, no ``fsync``). The writer,
a process of its own (``storage/writer_process.py``), follows the slot its gateway appends
to (``follow``): it reads records back from the page cache, moves the checkpoint and
``fsync``s the journal about once a second, off the request path. A process killed loses
nothing; a machine that loses power may lose the last second.

At ``max_bytes`` the spool takes no more records: they are dropped, counted and logged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

log = logging.getLogger("mes.spool")

SEGMENT_BYTES = 32 * 2**20


@dataclass(frozen=True, slots=True, order=True)
class Position:
    segment: int
    offset: int


class SpoolBusy(RuntimeError):
    """Every slot is held by a running process (more processes than ``MAX_SLOTS``)."""


MAX_SLOTS = 256


class Spool:
    def __init__(self, root: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.slot: Path | None = None
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segment = 0
        self._end = 0  # offset of the end of the current segment
        self._bytes = 0  # bytes past the checkpoint, all segments
        self._synced = True
        self.checkpoint = Position(1, 0)
        self.following = False  # reading a slot another process appends to
        self.released = 0  # bytes this object's commits released, since it opened
        # the owner's view of the bytes a writer in another process has released
        self.released_elsewhere: Callable[[], int] | None = None

    # -- opening --------------------------------------------------------------------------

    def open(self) -> None:
        """Take a free slot, repair a record cut short by a crash, and find the checkpoint."""
        self.root.mkdir(parents=True, exist_ok=True)
        for number in range(MAX_SLOTS):
            if self.take(self.root / f"slot-{number}"):
                return
        raise SpoolBusy(f"all {MAX_SLOTS} spool slots under {self.root} are in use")

    def take(self, slot: Path) -> bool:
        """Open ``slot`` if no live process holds it."""
        slot.mkdir(parents=True, exist_ok=True)
        fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.slot, self._lock_fd = slot, fd
        self.checkpoint = self._read_checkpoint()
        segments = self._segments()
        self._segment = max([self.checkpoint.segment, *segments])
        path = self._path(self._segment)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._end = _repair(path)
        if self.checkpoint.segment == self._segment and self.checkpoint.offset > self._end:
            # A checkpoint into a segment that is gone (made again empty just now): records
            # appended from here on would be skipped up to it.
            log.warning("spool %s: checkpoint past the end of its segment: reset", slot)
            self.checkpoint = Position(self._segment, 0)
            self._write_checkpoint(self.checkpoint)
        self._count(segments)
        if self._bytes:
            log.info("spool %s: %d bytes of records to write", self.slot, self._bytes)
        return True

    def count_pending(self) -> int:
        """The whole records past the checkpoint: a line each (a scan of what is pending;
        a GiB, the most a spool holds by default, takes about a second)."""
        count = 0
        for number in self._segments():
            if number < self.checkpoint.segment:
                continue
            with open(self._path(number), "rb") as segment:
                if number == self.checkpoint.segment:
                    segment.seek(self.checkpoint.offset)
                while chunk := segment.read(2**22):
                    count += chunk.count(b"\n")
        return count

    def recount(self) -> None:
        """Count the bytes past the checkpoint again, from disk: the owner's side, once the
        writer process that moved the checkpoint has died (what it had released last may
        not have been reported)."""
        self.checkpoint = self._read_checkpoint()
        self._count(self._segments())

    def _count(self, segments: list[int]) -> None:
        self._bytes = sum(
            self._segment_size(n) - (self.checkpoint.offset if n == self.checkpoint.segment else 0)
            for n in segments
            if n >= self.checkpoint.segment
        )

    def follow(self, slot: Path) -> None:
        """Read and commit the records of ``slot``, which the process holding its lock
        appends to: the writer's side of a slot. Where the records end is read from disk."""
        self.slot, self.following = slot, True
        self.checkpoint = self._read_checkpoint()
        self._refresh()

    def clear(self) -> None:
        """Delete every record of this slot (after they were moved elsewhere)."""
        assert self.slot is not None
        # The checkpoint first: a crash midway leaves records to be written again (writes
        # are idempotent), never a checkpoint into segments that are gone.
        (self.slot / "checkpoint").unlink(missing_ok=True)
        for number in self._segments():
            self._path(number).unlink(missing_ok=True)
        self._bytes = 0

    def orphans(self) -> list[Path]:
        """Other slots whose process is gone and which still hold records."""
        found = []
        for slot in sorted(self.root.glob("slot-*")):
            if slot == self.slot or not _holds_records(slot):
                continue
            fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
            found.append(slot)
        return found

    def close(self) -> None:
        self.sync()
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    # -- the request path -----------------------------------------------------------------

    def append(self, entry: bytes) -> Position | None:
        """Append one record (a JSON line without its newline); where it ends, or None when
        the spool is full."""
        assert self._fd is not None, "spool not open"
        line = entry + b"\n"
        if self.pending_bytes + len(line) > self.max_bytes:
            return None
        if self._end >= self.segment_bytes:
            self._rotate()
        try:
            written = os.write(self._fd, line)
            while written < len(line):  # a regular file takes it whole; be sure anyway
                written += os.write(self._fd, line[written:])
        except OSError:
            # A full disk, say: cut what went in, or the next record would be glued to it
            # and both be unreadable.
            os.ftruncate(self._fd, self._end)
            raise
        self._end += len(line)
        self._bytes += len(line)
        self._synced = False
        return Position(self._segment, self._end)

    # -- the writer -----------------------------------------------------------------------

    @property
    def end(self) -> Position:
        if self.following:
            self._refresh()
        return Position(self._segment, self._end)

    @property
    def pending_bytes(self) -> int:
        """Bytes of records appended and not yet written."""
        if self.released_elsewhere is None:
            return self._bytes
        return self._bytes - self.released_elsewhere()

    def read(
        self, start: Position, limit: int, max_bytes: int = sys.maxsize
    ) -> list[tuple[bytes, Position]]:
        """Up to ``limit`` whole records after ``start``, each with the position it ends at;
        with ``max_bytes``, no more once they add up to that many (one, at least): a batch of
        200 KB prompts is a few MB, not 200 of them read to keep 20."""
        out: list[tuple[bytes, Position]] = []
        size = 0
        position = start
        end = self.end
        while len(out) < limit and position < end and size < max_bytes:
            path = self._path(position.segment)
            if not path.exists() or position.offset >= self._segment_size(position.segment):
                if position.segment >= self._segment:
                    break
                position = Position(position.segment + 1, 0)
                continue
            offset = position.offset
            with open(path, "rb") as segment:
                segment.seek(offset)
                while len(out) < limit and size < max_bytes:
                    line = segment.readline()
                    if not line.endswith(b"\n"):
                        break  # the end, or a record still being written
                    offset += len(line)
                    size += len(line)
                    out.append((line[:-1], Position(position.segment, offset)))
            if offset == position.offset:
                break  # a record still being written
            position = Position(position.segment, offset)
        return out

    def past_ended(self, position: Position) -> Position:
        """Where the next record after ``position`` will start: past the ends of segments
        the owner has left for a newer one (which may hold no record yet)."""
        end = self.end
        while position.segment < end.segment and position.offset >= self._segment_size(
            position.segment
        ):
            position = Position(position.segment + 1, 0)
        return position

    def commit(self, position: Position) -> None:
        """Everything up to ``position`` is in the database: move the checkpoint there and
        delete the segments wholly before it."""
        if position <= self.checkpoint:
            return
        released = self._distance(self.checkpoint, position)
        self.released += released
        self.checkpoint = position
        assert self.slot is not None
        self._write_checkpoint(position)
        for number in self._segments():
            if number < position.segment:
                self._path(number).unlink(missing_ok=True)
        self._bytes = max(0, self._bytes - released)

    def written_through(self) -> Position:
        """The checkpoint as the writer following this slot last wrote it (from disk)."""
        return self._read_checkpoint()

    def sync(self) -> None:
        """``fsync`` the journal: called by the writer, off the request path."""
        if self.following:
            try:  # fsync writes a file's dirty pages whoever wrote them
                fd = os.open(self._path(self.end.segment), os.O_RDONLY)
            except FileNotFoundError:
                return
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif self._fd is not None and not self._synced:
            self._synced = True
            os.fsync(self._fd)

    def dead_letter(self, entry: bytes, reason: str) -> None:
        """Keep a record the database refused for good, with why, for an admin to see; what
        is not a record's JSON line (unreadable, or not ours) is kept as a string, ``raw``."""
        if not entry.endswith(b"}") or b"\n" in entry:
            entry = b'{"raw":' + _quoted(entry.decode(errors="replace")) + b"}"
        line = entry[:-1] + b',"dead_letter_reason":' + _quoted(reason) + b"}\n"
        with open(self.root / "dead-letter.jsonl", "ab") as file:
            file.write(line)

    # -- inside ---------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Where the records of a followed slot end: the end of its newest segment (the owner
        starts a segment only once the one before is whole)."""
        self._segment = max([self.checkpoint.segment, *self._segments()])
        try:
            self._end = self._path(self._segment).stat().st_size
        except FileNotFoundError:
            self._end = 0

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        path = self._path(self._segment + 1)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # first: may fail
        os.close(self._fd)
        self._fd, self._segment, self._end = fd, self._segment + 1, 0

    def _distance(self, start: Position, stop: Position) -> int:
        if start.segment == stop.segment:
            return stop.offset - start.offset
        total = self._segment_size(start.segment) - start.offset
        for number in range(start.segment + 1, stop.segment):
            total += self._segment_size(number)
        return total + stop.offset

    def _path(self, number: int) -> Path:
        assert self.slot is not None
        return self.slot / f"segment-{number:012d}.log"

    def _segment_size(self, number: int) -> int:
        if number == self._segment:
            return self._end
        try:
            return self._path(number).stat().st_size
        except FileNotFoundError:
            return 0

    def _segments(self) -> list[int]:
        assert self.slot is not None
        return sorted(int(p.stem.split("-")[1]) for p in self.slot.glob("segment-*.log"))

    def _write_checkpoint(self, position: Position) -> None:
        assert self.slot is not None
        temporary = self.slot / "checkpoint.new"
        temporary.write_text(f"{position.segment} {position.offset}\n")
        temporary.replace(self.slot / "checkpoint")

    def _read_checkpoint(self) -> Position:
        assert self.slot is not None
        try:
            segment, offset = (self.slot / "checkpoint").read_text().split()
            return Position(int(segment), int(offset))
        except (FileNotFoundError, ValueError):
            first = self._segments()
            return Position(first[0] if first else 1, 0)


def _holds_records(slot: Path) -> bool:
    for path in slot.glob("segment-*.log"):
        try:
            if path.stat().st_size:
                return True
        except FileNotFoundError:  # written and deleted meanwhile by the slot's writer
            continue
    return False


def _repair(path: Path) -> int:
    """Cut a record left half-written by a crash off the end of a segment; its new size."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as segment:
        keep = segment.read().rfind(b"\n") + 1  # a segment is tens of MB: read at start only
        if keep != size:
            log.warning("spool %s: dropping %d bytes of a half-written record", path, size - keep)
            segment.truncate(keep)
        return keep


def _quoted(text: str) -> bytes:
    return orjson.dumps(text)
