"""The history writer in a process of its own, beside each gateway process.

The gateway's request path only appends records to its spool slot (``storage/spool.py``).
Reading them back, building their rows (parsing answers, rebuilding streams, hashing
message chains) and writing them happen in a child process that follows the same slot, so
that none of it takes the event loop the requests are served on.

- The gateway holds the slot's lock; the child reads, writes, moves the checkpoint and
  ``fsync``s. Counters the child keeps (records written, retries, ...) and the bytes it has
  released from the spool live in a few integers of shared memory, which the gateway reads
  for ``/metrics``, ``/readyz`` and the spool's size limit.
- The gateway stops its writer by closing the child's stdin: the child writes what is
  spooled for at most ``GATEWAY_SHUTDOWN_GRACE`` seconds and exits; what is left stays
  spooled.
- A gateway that dies takes its writer with it (``PR_SET_PDEATHSIG``, and a writer whose
  gateway died before it asked for that stops at once), so a slot whose lock is free has
  no writer left on it; a writer that dies is started again by its gateway.
  Either way nothing is lost: what was not written is still in the spool.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import mmap
import os
import pickle
import signal
import subprocess
import sys
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from capture.codec import from_entry, shaped_entry, to_entry
from capture.redaction import Redactor
from capture.rows import Record
from storage import logs
from storage.database import create_engine, prepare_schema
from storage.dsn import parse_dsn
from storage.partitions import partitions_in_use
from storage.prices import Pricer, Prices, read_prices_file
from storage.queue import Forwarder
from storage.spool import Position, Spool
from storage.telemetry import span_export
from storage.writer import POLL_SECONDS, Counter, HistoryWriter, spool_record

log = logging.getLogger("mes.writer")

# The child's counters, as the gateway reports them, then what the child tells its gateway.
COUNTERS = (
    "records_written",
    "records_queued",
    "records_replayed",
    "records_dead_lettered",
    "records_failed",
    "records_erased",
    "write_retries",
    "otel_spans_exported",
    "otel_spans_dropped",
)
# Upper bounds of the writer's batch duration histogram, in seconds (a batch's time from its
# first try to its commit, retries included).
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCHES = tuple(f"batches_le_{n}" for n in range(len(BATCH_BUCKETS) + 1))
_FIELDS = (
    *COUNTERS,
    *_BATCHES,
    "batches_sum_us",
    "released_bytes",
    "ready",
    "stalled_since_ms",
    "queue_reachable",
    "costs_seq",
    "costs_length",
)
_INDEX = {name: index for index, name in enumerate(_FIELDS)}
COSTS_BYTES = 65536  # the costs by model, as JSON, after the integers
_BLOB_AT = 8 * len(_FIELDS)
_SIZE = _BLOB_AT + COSTS_BYTES
RESTART_SECONDS = 1.0


@dataclass(frozen=True)
class WriterConfig:
    """What a writer process needs to know, as the gateway's settings give it."""

    history_dsn: str
    pool: dict[str, Any]  # storage.database.create_engine's pool options
    daily_partition: bool
    spool_dir: str
    spool_max_bytes: int
    batch_size: int
    flush_interval: float
    retry_seconds: float
    redact_patterns: tuple[str, ...]
    capture_content: bool
    shutdown_grace: float
    log_level: str
    log_format: str
    # The provider of each upstream, by name, for prices; and MES_PRICES_FILE.
    providers: dict[str, str | None] = field(default_factory=dict)
    prices_file: str | None = None
    auto_migrate: bool = True
    # How much lower than its gateway's this process's CPU priority is (MES_WRITER_NICE):
    # the records wait in the spool while requests are served, not the requests.
    nice: int = 0
    # OpenTelemetry: a span per stored record (OTEL_EXPORTER_OTLP_ENDPOINT), with message
    # content (OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT).
    otel: bool = False
    otel_content: bool = False
    # MES_QUEUE: a gateway's child forwards its records to this Redis stream instead of
    # writing them (storage/queue.py); a writer (python -m gateway writer) has none.
    queue: str | None = field(default=None, repr=False)
    queue_durable_seconds: float = 2.0

    def __repr__(self) -> str:  # the DSN may hold a password
        return f"WriterConfig(spool_dir={self.spool_dir!r}, batch_size={self.batch_size})"


class SharedState:
    """A few 64-bit integers in shared memory (a ``memfd``): the child writes them, the
    gateway reads them. An aligned 8-byte store is atomic, so a reader sees a whole value.
    After them, the dollars spent by model, as JSON, behind a sequence number the child
    makes odd while it writes them (a reader that sees it odd, or changed, reads again)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _SIZE)
        self._values = memoryview(self._map)[:_BLOB_AT].cast("q")

    @classmethod
    def create(cls) -> SharedState:
        fd = os.memfd_create("mes-writer-state")
        os.ftruncate(fd, _SIZE)
        return cls(fd)

    def write_costs(self, costs: Mapping[str, float]) -> None:
        blob = orjson.dumps(costs)
        if len(blob) > COSTS_BYTES:  # thousands of model names: the costliest that fit
            kept = dict(sorted(costs.items(), key=lambda item: -item[1])[:500])
            blob = orjson.dumps(kept)[:COSTS_BYTES]
        self["costs_seq"] += 1
        self._map[_BLOB_AT : _BLOB_AT + len(blob)] = blob
        self["costs_length"] = len(blob)
        self["costs_seq"] += 1

    def read_costs(self) -> dict[str, float]:
        for _ in range(100):
            before = self["costs_seq"]
            if before % 2:
                continue
            blob = self._map[_BLOB_AT : _BLOB_AT + self["costs_length"]]
            if self["costs_seq"] == before:
                found: dict[str, float] = orjson.loads(blob) if blob else {}
                return found
        return {}

    def __getitem__(self, name: str) -> int:
        return int(self._values[_INDEX[name]])

    def __setitem__(self, name: str, value: int) -> None:
        self._values[_INDEX[name]] = value

    def counters(self) -> dict[str, int]:
        return {name: self[name] for name in COUNTERS}

    def batches(self) -> list[float]:
        """The batch duration histogram: counts by bucket (of ``BATCH_BUCKETS``, then past
        them all), then the sum of the durations in seconds."""
        return [*(float(self[name]) for name in _BATCHES), self["batches_sum_us"] / 1e6]


class SharedCounter:
    """The child's counts: each goes to the shared state, for its gateway to report."""

    def __init__(self, state: SharedState) -> None:
        self.state = state
        self.costs = state.read_costs()  # the writer before this one's

    def inc(self, name: str, amount: int = 1) -> None:
        self.state[name] += amount

    def add_costs(self, costs: Mapping[str, float]) -> None:
        for model, usd in costs.items():
            self.costs[model] = self.costs.get(model, 0.0) + usd
        self.state.write_costs(self.costs)

    def observe_batch(self, seconds: float) -> None:
        self.state[_BATCHES[bisect_left(BATCH_BUCKETS, seconds)]] += 1
        self.state["batches_sum_us"] += round(seconds * 1e6)


class WriterProcess:
    """The gateway's side: spools what the request path captures and keeps a writer process
    following the spool's slot."""

    def __init__(self, config: WriterConfig, spool: Spool, metrics: Counter) -> None:
        # What a gateway before this one left unwritten in the slot (``depth``).
        self._found = spool.count_pending() if spool.pending_bytes else 0
        self.config = config
        self.spool = spool
        self.metrics = metrics
        self.state = SharedState.create()
        spool.released_elsewhere = lambda: self.state["released_bytes"]
        self.ready_event = asyncio.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self._appended = 0
        self._supervisor: asyncio.Task[None] | None = None
        redactor = Redactor(config.redact_patterns, capture_content=config.capture_content)
        # Redacting, the gateway spools rows as they may be stored (capture/shaped.py).
        self.encode = shaped_entry(redactor) if redactor.active else to_entry

    def counters(self) -> dict[str, int]:
        """What the writer process has counted (records written, retries, ...)."""
        return self.state.counters()

    def batches(self) -> list[float]:
        """The writer process's batch duration histogram (``SharedState.batches``)."""
        return self.state.batches()

    def costs(self) -> dict[str, float]:
        """The dollars spent by model on the records the writer process wrote."""
        return self.state.read_costs()

    @property
    def ready(self) -> bool:
        return bool(self.state["ready"])

    @property
    def queue_reachable(self) -> bool:
        """With MES_QUEUE: Redis answered the forwarder's last call."""
        return bool(self.state["queue_reachable"])

    @property
    def stalled_seconds(self) -> float:
        """How long the writer has had records it could not write (0: it keeps up)."""
        since = self.state["stalled_since_ms"]
        if not since or not self.spool.pending_bytes:
            return 0.0
        return max(0.0, time.time() - since / 1000)

    @property
    def depth(self) -> int:
        """Records in this process's spool slot that are not written yet: those it found
        there when it started, those it spooled since, those it adopted."""
        state = self.state
        done = sum(
            state[name]
            for name in (
                "records_written",
                "records_queued",
                "records_dead_lettered",
                "records_failed",
                "records_erased",
            )
        )
        return max(0, self._found + self._appended - done)

    def submit(self, record: Record) -> bool:
        """Spool ``record``; False (counted and logged) only when the spool is full."""
        if not spool_record(self.spool, self.metrics, self.encode, record):
            return False
        self._appended += 1
        return True

    def appended(self, count: int) -> None:
        """``count`` records were appended to the spool by someone else (an adoption)."""
        self._appended += count

    def start(self) -> None:
        self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="mes-writer-supervisor")

    async def close(self, grace: float) -> None:
        """Let the writer write what is spooled, for at most ``grace`` seconds."""
        if self._supervisor is not None:
            self._supervisor.cancel()
        process = self.process
        if process is not None and process.poll() is None:
            assert process.stdin is not None
            process.stdin.close()  # the writer's cue to finish
            try:
                await asyncio.to_thread(process.wait, grace + 5.0)
            except subprocess.TimeoutExpired:
                log.warning("writer process did not stop in time: killed")
                process.kill()
                await asyncio.to_thread(process.wait)
        self.spool.close()

    def _spawn(self) -> None:
        assert self.spool.slot is not None
        config = pickle.dumps(self.config)
        # What is in the slot now was spooled before this writer (replayed, in its counts);
        # what comes after is new, records adopted from another slot meanwhile included.
        end = self.spool.end
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "storage.writer_process",
                str(self.spool.slot),
                str(self.state.fd),
                str(os.getpid()),
                f"{end.segment}:{end.offset}",
            ],
            stdin=subprocess.PIPE,
            pass_fds=(self.state.fd,),
        )
        assert self.process.stdin is not None
        self.process.stdin.write(len(config).to_bytes(8, "big") + config)
        self.process.stdin.flush()

    async def _supervise(self) -> None:
        """Note when the writer is ready; start it again if it dies."""
        while True:
            await asyncio.sleep(POLL_SECONDS if not self.ready_event.is_set() else 0.5)
            if self.ready:
                self.ready_event.set()
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                log.error("writer process exited with %s: starting another", code)
                await asyncio.sleep(RESTART_SECONDS)
                # What the dead writer released is on disk; its last report may be missing.
                self.spool.recount()
                self.state["released_bytes"] = 0
                self._spawn()


# -- the child ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux)."""
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        log.warning("cannot tie the writer's life to its gateway's on this system")


async def _serve(
    config: WriterConfig, slot: Path, state: SharedState, stdin: IO[bytes], replayed: Position
) -> None:
    spool = Spool(Path(config.spool_dir), config.spool_max_bytes)
    spool.follow(slot)
    counter = SharedCounter(state)
    stalled_since = state["stalled_since_ms"] / 1000 or None  # the writer before this one's
    engine = create_engine(parse_dsn(config.history_dsn), **config.pool)

    async def set_up() -> None:
        await prepare_schema(
            engine,
            config.history_dsn,
            "history",
            auto_migrate=config.auto_migrate,
            connect_timeout=config.pool["connect_timeout"],
        )

    worker: HistoryWriter | Forwarder
    if config.queue:
        worker = Forwarder(
            config.queue,
            spool,
            counter,
            retry_seconds=config.retry_seconds,
            durable_seconds=config.queue_durable_seconds,
            prepare=set_up,
            stalled_since=stalled_since,
        )
    else:
        worker = _history_writer(config, engine, set_up, spool, counter, stalled_since, replayed)
    released = state["released_bytes"]  # by the writers before this one

    async def report() -> None:
        while True:
            state["released_bytes"] = released + spool.released
            state["ready"] = int(worker.ready)
            stalled = worker.stalled_since
            state["stalled_since_ms"] = 0 if stalled is None else int(stalled * 1000)
            state["queue_reachable"] = int(isinstance(worker, Forwarder) and worker.reachable)
            await asyncio.sleep(POLL_SECONDS)

    worker.start()
    reporter = asyncio.create_task(report())
    await asyncio.to_thread(stdin.read)  # until the gateway closes it: time to stop
    await worker.close(config.shutdown_grace)
    if isinstance(worker, HistoryWriter) and worker.spans is not None:
        await asyncio.to_thread(worker.spans.close)
    reporter.cancel()
    state["released_bytes"] = released + spool.released
    await engine.dispose()


def _history_writer(
    config: WriterConfig,
    engine: AsyncEngine,
    set_up: Callable[[], Awaitable[None]],
    spool: Spool,
    counter: SharedCounter,
    stalled_since: float | None,
    replayed: Position,
) -> HistoryWriter:
    async def prepare() -> None:
        await set_up()
        today = datetime.now(UTC).date()
        writer.partitions = await partitions_in_use(engine, config.daily_partition, today)

    writer = HistoryWriter(
        engine,
        counter,
        spool,
        encode=to_entry,
        decode=from_entry,
        batch_size=config.batch_size,
        flush_interval=config.flush_interval,
        retry_seconds=config.retry_seconds,
        prepare=prepare,
        redactor=Redactor(config.redact_patterns, capture_content=config.capture_content),
        pricer=Pricer(
            Prices(*read_prices_file(config.prices_file)) if config.prices_file else Prices(),
            config.providers,
        ),
        stalled_since=stalled_since,
        replayed_until=replayed,
        spans=span_export(counter, config.providers, config.otel_content) if config.otel else None,
    )
    return writer


def main() -> None:
    _die_with_parent()
    if os.getppid() != int(sys.argv[3]):
        # The gateway died before the line above (while this process imported): no one
        # holds the slot's lock now, and another process may be taking the slot over.
        sys.exit("mes-writer: the gateway that started this writer is gone")
    # The gateway decides when its writer stops: a Ctrl-C or a SIGTERM sent to the whole
    # process group reaches the gateway, which then closes this process's stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    size = int.from_bytes(stdin.read(8), "big")
    config: WriterConfig = pickle.loads(stdin.read(size))
    logs.configure(config.log_level, config.log_format)
    os.nice(config.nice)
    state = SharedState(int(sys.argv[2]))
    import uvloop

    segment, offset = map(int, sys.argv[4].split(":"))
    uvloop.run(_serve(config, Path(sys.argv[1]), state, stdin, Position(segment, offset)))


if __name__ == "__main__":
    main()
