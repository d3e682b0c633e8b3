"""The spool on its own: records appended survive a reopen, a checkpoint moves past what
was written, a half-written record is cut off, and slots belong to one process each."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from capture.codec import from_entry, to_entry
from gateway.metrics import Metrics
from storage.spool import Position, Spool
from storage.writer import spool_record
from tests.test_message_store import exchange

REPO = Path(__file__).resolve().parent.parent


def entries(count: int, size: int = 10) -> list[bytes]:
    return [b'{"id":"%d","pad":"%s"}' % (n, b"x" * size) for n in range(count)]


def test_records_are_read_back_in_order_across_segments_and_reopens(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**9, segment_bytes=300)
    spool.open()
    written = entries(50)
    for entry in written:
        assert spool.append(entry) is not None
    assert len(list(spool.slot.glob("segment-*.log"))) > 3  # type: ignore[union-attr]
    first = spool.read(spool.checkpoint, 20)
    assert [e for e, _ in first] == written[:20]
    spool.commit(first[-1][1])
    spool.close()

    again = Spool(tmp_path, max_bytes=10**9, segment_bytes=300)
    again.open()
    assert again.slot == spool.slot
    rest = again.read(again.checkpoint, 1000)
    assert [e for e, _ in rest] == written[20:]
    again.commit(rest[-1][1])
    assert again.pending_bytes == 0
    assert len(list(again.slot.glob("segment-*.log"))) == 1  # type: ignore[union-attr]
    again.close()


def test_a_read_stops_once_its_records_reach_the_bytes_asked_for(tmp_path: Path) -> None:
    """The writer reads a batch of about 4 MB: of 200 KB prompts, 20 records, not the 200 a
    batch may count (each read costs the writer's memory what it holds)."""
    spool = Spool(tmp_path, max_bytes=10**9, segment_bytes=10**6)
    spool.open()
    written = entries(30, size=1000)  # 1,020 bytes a line, newline included
    for entry in written:
        assert spool.append(entry) is not None
    assert [e for e, _ in spool.read(spool.checkpoint, 200, max_bytes=5000)] == written[:5]
    assert [e for e, _ in spool.read(spool.checkpoint, 200, max_bytes=1)] == written[:1]
    assert len(spool.read(spool.checkpoint, 200)) == 30
    spool.close()


def test_a_record_cut_short_by_a_crash_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**9)
    spool.open()
    for entry in entries(3):
        spool.append(entry)
    spool.close()
    (segment,) = spool.slot.glob("segment-*.log")  # type: ignore[union-attr]
    with open(segment, "ab") as file:
        file.write(b'{"id":"half-writ')  # what a kill -9 mid-write leaves
    again = Spool(tmp_path, max_bytes=10**9)
    again.open()
    again.append(b'{"id":"after"}')
    assert [e for e, _ in again.read(again.checkpoint, 10)] == [*entries(3), b'{"id":"after"}']


def test_the_spool_refuses_records_beyond_its_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100)
    spool.open()
    accepted = [spool.append(entry) is not None for entry in entries(10)]
    assert accepted[:3] == [True, True, True] and accepted[-1] is False
    spool.commit(spool.end)
    assert spool.append(entries(1)[0]) is not None  # room again once written


def test_a_slot_belongs_to_one_live_process_and_a_dead_ones_is_an_orphan(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from storage.spool import Spool\n"
            f"s = Spool(Path({str(tmp_path)!r}), 10**6); s.open(); s.append(b'{{}}')\n"
            "print(s.slot.name, flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    taken = holder.stdout.readline().strip()
    mine = Spool(tmp_path, 10**6)
    mine.open()
    assert mine.slot is not None and mine.slot.name != taken
    assert mine.orphans() == []  # the other slot's process is alive
    holder.kill()
    holder.wait()
    assert [slot.name for slot in mine.orphans()] == [taken]
    assert Position(1, 0) <= mine.checkpoint
    # A segment the slot's writer deletes between the listing and the look at its size (a
    # gateway starting beside a live one) is no reason to stop.
    real_stat = Path.stat

    def deleted_meanwhile(path: Path, **kwargs: bool) -> os.stat_result:
        if path.name.startswith("segment-"):
            raise FileNotFoundError(path)
        return real_stat(path, **kwargs)

    Path.stat = deleted_meanwhile  # type: ignore[method-assign]
    try:
        assert mine.orphans() == []
    finally:
        Path.stat = real_stat  # type: ignore[method-assign]


def test_a_slot_cleared_up_to_a_crash_loses_none_of_the_records_appended_after(
    tmp_path: Path,
) -> None:
    """Clearing a slot (its records moved elsewhere) deletes the checkpoint before the
    segments. A crash after the segments went, before the checkpoint did, used to leave a
    checkpoint into a segment that the slot's next owner makes again, empty: the records
    it appended were skipped up to that checkpoint."""
    spool = Spool(tmp_path, max_bytes=10**9)
    spool.open()
    for entry in entries(3):
        spool.append(entry)
    spool.commit(spool.read(spool.checkpoint, 2)[-1][1])
    slot = spool.slot
    assert slot is not None
    cleared = []
    real_unlink = Path.unlink

    def crash_at_the_checkpoint(path: Path, missing_ok: bool = False) -> None:
        if path.name == "checkpoint":
            raise SystemExit("killed")  # the process dies here
        cleared.append(path.name)
        real_unlink(path, missing_ok=missing_ok)

    Path.unlink = crash_at_the_checkpoint  # type: ignore[method-assign]
    try:
        spool.clear()
    except SystemExit:
        pass
    finally:
        Path.unlink = real_unlink  # type: ignore[method-assign]
    spool.close()
    # However far the clear got, the slot's next owner reads back all it appends.
    later = Spool(tmp_path, max_bytes=10**9)
    assert later.take(slot)
    for entry in entries(3, size=20):
        later.append(entry)
    assert [e for e, _ in later.read(later.checkpoint, 10)][-3:] == entries(3, size=20)
    later.close()


def test_the_next_record_is_found_past_a_segment_the_owner_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**9, segment_bytes=100)
    spool.open()
    for entry in entries(5):
        spool.append(entry)
    last = spool.read(spool.checkpoint, 10)[-1][1]
    assert spool.past_ended(last) == last  # the owner still appends to this segment
    spool._rotate()  # the owner moved on (and may have died before it appended)
    assert spool.past_ended(last) == Position(last.segment + 1, 0)
    spool.close()


def test_a_record_the_disk_takes_half_of_is_cut_and_the_next_reads_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk takes half a record, then refuses the rest: the record is counted as
    dropped (its answer still goes to the client), and the half is cut off, so the next
    record is not glued to it."""
    spool = Spool(tmp_path, max_bytes=10**9)
    spool.open()
    metrics = Metrics()
    first, lost, last = (exchange([{"role": "user", "content": t}]) for t in "abc")
    assert spool_record(spool, metrics, to_entry, first)
    real_write = os.write

    def disk_full(fd: int, data: bytes) -> int:
        if len(data) > 1:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("storage.spool.os.write", disk_full)
    assert not spool_record(spool, metrics, to_entry, lost)
    monkeypatch.setattr("storage.spool.os.write", real_write)
    assert spool_record(spool, metrics, to_entry, last)
    read = [from_entry(entry).id for entry, _ in spool.read(spool.checkpoint, 10)]
    assert read == [first.id, last.id]
    assert metrics.counters["records_dropped"] == 1
    spool.close()


def test_the_owner_counts_what_is_left_again_from_disk(tmp_path: Path) -> None:
    """The writer process moves the checkpoint and reports what it released; a writer that
    dies may not have reported its last commit. Its gateway then counts again from disk."""
    owner = Spool(tmp_path, max_bytes=10**9)
    owner.open()
    written = entries(3)
    for entry in written:
        owner.append(entry)
    assert owner.slot is not None
    follower = Spool(tmp_path, max_bytes=10**9)
    follower.follow(owner.slot)
    follower.commit(follower.read(follower.checkpoint, 2)[-1][1])  # and then it died
    assert owner.pending_bytes == sum(len(e) + 1 for e in written)
    owner.recount()
    assert owner.pending_bytes == len(written[2]) + 1
    owner.close()


def test_a_dead_letter_is_one_json_line_with_its_reason_whatever_it_held(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=2**20)
    spool.open()
    spool.dead_letter(b'{"id": "r1"}', "refused")
    spool.dead_letter(b"not json at all", "unreadable")
    spool.dead_letter(b'{"a": 1}\n{"b": 2}', "two lines in one entry")
    lines = (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line) for line in lines] == [
        {"id": "r1", "dead_letter_reason": "refused"},
        {"raw": "not json at all", "dead_letter_reason": "unreadable"},
        {"raw": '{"a": 1}\n{"b": 2}', "dead_letter_reason": "two lines in one entry"},
    ]
    spool.close()
