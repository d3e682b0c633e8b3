"""Records per second through the Redis stream (``MES_QUEUE``), against the local spool, in
one run.

    python bench/queue_writers.py [--records 20000] [--rounds 3] [--backend postgresql]
                                  [--cases forward "queue x1" "queue x2"]

Each round, on one durable database server (PostgreSQL by default) and one Redis
(``appendonly yes``, ``appendfsync everysec``), each case writes the same ``--records``
records (``bench/writer.py``'s: a new conversation each, ~1 KB prompt) into a fresh
database:

- ``spool``: the baseline, a gateway's own writer process draining its local spool;
- ``forward``: a gateway's writer process with ``MES_QUEUE``, moving the spooled records
  into the stream (the gateway's side; nothing is written to the database), each leaving
  the spool as soon as Redis has it (not ``MES_QUEUE_DURABLE_SECONDS`` later);
- ``queue x1``, ``queue x2``: one or two ``python -m gateway writer`` processes writing
  them from the stream, until every one is acknowledged.

The processes are started and ready first; then every record is handed over at once (to
the spool, or to the stream), and the time and CPU counted from there: a backlog drained.

Prints each case's records/s (records over the time from the start until the last was
written, or forwarded) and its CPU per record: the writer processes (a writer with its
history writer child), the database server and Redis, read from ``/proc``; then the
medians over the rounds. Everything runs on this machine's cores, the database too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.writer import cpu_seconds, record, started_writer  # noqa: E402
from capture.codec import to_entry  # noqa: E402
from fake_upstream.responses import Answer  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from storage.queue import GROUP, STREAM  # noqa: E402
from tests.dbservers import RedisServer, start_mariadb, start_postgres, start_redis  # noqa: E402

CASES = ("spool", "forward", "queue x1", "queue x2")


def entries(count: int) -> list[bytes]:
    answer = Answer(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, 8
    ).completion()
    return [to_entry(record(n, answer)) for n in range(count)]


async def through_spool(
    settings: Settings, workdir: Path, lines: list[bytes], database: int | None, redis: int
) -> Result:
    """A gateway's writer process, started and ready, then handed every record at once:
    records/s and CPU a record (with ``settings.queue_url``, into the stream; without, into
    the database)."""
    spool, writer = await started_writer(
        replace(settings, spool_dir=str(workdir / "spool"), spool_max_bytes=2**36)
    )
    assert writer.process is not None
    pid = writer.process.pid
    before = (cpu_seconds(pid), *_cpu(database, redis))
    started = time.perf_counter()
    for line in lines:
        spool.append(line)
    writer.appended(len(lines))
    while writer.depth:  # noqa: ASYNC110 (a counter in another process's memory)
        await asyncio.sleep(0.02)
    took = time.perf_counter() - started
    after = (cpu_seconds(pid), *_cpu(database, redis))
    await writer.close(5)
    return _result(len(lines), took, before, after)


async def through_queue(
    settings: Settings,
    workdir: Path,
    lines: list[bytes],
    writers: int,
    database: int | None,
    redis: RedisServer,
) -> Result:
    """``writers`` writer processes, started and reading, then every record added to the
    stream at once (by this process, in pipelines of 1,000: Redis' CPU for the additions
    counts in the figures, this process's does not): records/s and CPU a record."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis.url)
    await client.delete(STREAM)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "SQL_DSN": settings.sql_dsn or "",
        "MES_QUEUE": redis.url,
        "MES_BATCH_SIZE": str(settings.capture_batch_size),
    }
    processes = []
    for n in range(writers):
        folder = workdir / f"writer-{n}"
        folder.mkdir()
        processes.append(
            subprocess.Popen(  # noqa: ASYNC220 (started once, then measured)
                [sys.executable, "-m", "gateway", "writer"],
                env=env,
                cwd=folder,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    # Warm-up records, one at a time, until every writer has taken one and they are all
    # written: every writer and its history writer process are up.
    warm = 0
    while len(await _consumers(client)) < writers or await _unwritten(client, warm):
        if not await _unwritten(client, warm):
            await client.xadd(STREAM, {b"r": lines[-1 - warm]})
            warm += 1
        await asyncio.sleep(0.1)
    lines = lines[: len(lines) - warm]
    assert redis.process is not None

    def cpu() -> tuple[float, float, float]:
        used = sum(cpu_seconds(p.pid, children=True) for p in processes)
        return (used, *_cpu(database, redis.process.pid if redis.process else None))

    before = cpu()
    started = time.perf_counter()
    for start in range(0, len(lines), 1000):
        pipe = client.pipeline(transaction=False)
        for line in lines[start : start + 1000]:
            pipe.execute_command("XADD", STREAM, "*", b"r", line)
        await pipe.execute()
    while await _unwritten(client, warm + len(lines)):  # noqa: ASYNC110 (Redis' count)
        await asyncio.sleep(0.02)
    took = time.perf_counter() - started
    after = cpu()
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(30)
    await client.delete(STREAM)
    await client.aclose()
    return _result(len(lines), took, before, after)


async def _unwritten(client: Any, added: int) -> bool:
    """Of the ``added`` records, some are not read yet, or not acknowledged."""
    try:
        groups = await client.xinfo_groups(STREAM)
    except Exception:  # no stream yet
        return bool(added)
    ours = [group for group in groups if group["name"] == GROUP.encode()]
    return not ours or ours[0]["entries-read"] != added or bool(ours[0]["pending"])


async def _consumers(client: Any) -> list[Any]:
    try:
        found: list[Any] = await client.xinfo_consumers(STREAM, GROUP)
    except Exception:  # no stream or group yet
        return []
    return found


def _result(count: int, took: float, before: tuple[float, ...], after: tuple[float, ...]) -> Result:
    used = (b - a for a, b in zip(before, after, strict=True))
    return Result(count / took, *(seconds / count * 1e6 for seconds in used))


def _cpu(database: int | None, redis: int | None) -> tuple[float, float]:
    return cpu_seconds(database, children=True), cpu_seconds(redis)


@dataclass
class Result:
    rate: float  # records/s
    writers: float  # CPU us a record: the writer processes
    database: float  # the database server
    redis: float

    @property
    def cpu(self) -> float:
        return self.writers + self.database + self.redis

    def __str__(self) -> str:
        return (
            f"{self.rate:8,.0f} records/s, CPU a record {self.cpu:5,.0f} us (writers "
            f"{self.writers:,.0f}, database {self.database:,.0f}, Redis {self.redis:,.0f})"
        )


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    start = start_postgres if args.backend == "postgresql" else start_mariadb
    server = start(workdir / args.backend, durable=True)
    redis = start_redis(workdir / "redis")
    try:
        await _configure(redis)
        if server.process is not None:
            database: int | None = server.process.pid
        else:
            database = int((server.base / "data" / "postmaster.pid").read_text().split()[0])
        assert redis.process is not None
        lines = entries(args.records)
        results: dict[str, list[Result]] = {case: [] for case in CASES}
        cases = [case for case in CASES if case == "spool" or case in args.cases]
        for round_number in range(args.rounds):
            for case in cases:
                folder = workdir / f"round-{round_number}-{case.replace(' ', '')}"
                folder.mkdir()
                settings = replace(
                    Settings(),
                    sql_dsn=server.url(f"mes_bench_queue_{round_number}_{case[0]}{case[-1]}"),
                    spool_dir=str(folder / "spool"),
                    spool_max_bytes=2**36,
                )
                await _migrated(settings, folder)  # outside the time taken
                if case == "spool":
                    result = await through_spool(
                        settings, folder, lines, database, redis.process.pid
                    )
                elif case == "forward":
                    # Records leave the spool at once once in Redis: the rate the stream takes
                    # them, not the durability window (MES_QUEUE_DURABLE_SECONDS) on top.
                    queued = replace(settings, queue_url=redis.url, queue_durable_seconds=0.01)
                    result = await through_spool(queued, folder, lines, database, redis.process.pid)
                    await _clear(redis)
                else:
                    writers = int(case[-1])
                    result = await through_queue(settings, folder, lines, writers, database, redis)
                results[case].append(result)
                print(f"round {round_number + 1} {case:>9}: {result}", flush=True)
        print(f"\nmedians of {args.rounds} rounds, {args.records:,} records each, {args.backend}:")
        baseline = statistics.median(r.rate for r in results["spool"])
        for case in cases:
            median = Result(
                *(
                    statistics.median(getattr(r, name) for r in results[case])
                    for name in ("rate", "writers", "database", "redis")
                )
            )
            print(f"{case:>9}: {median} ({median.rate / baseline:4.2f} x the spool's rate)")
    finally:
        redis.shutdown()
        server.shutdown()


async def _migrated(settings: Settings, folder: Path) -> None:
    """A writer of its own makes and migrates the database, then stops."""
    _, setup = await started_writer(replace(settings, spool_dir=str(folder / "setup")))
    await setup.close(5)


async def _configure(redis: RedisServer) -> None:
    """Redis' log written once a second, as most deployments run it."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis.url)
    await client.config_set("appendfsync", "everysec")
    await client.aclose()


async def _clear(redis: RedisServer) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis.url)
    await client.delete(STREAM)
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=["postgresql", "mysql"], default="postgresql")
    parser.add_argument(
        "--cases", nargs="+", choices=CASES[1:], default=CASES[1:], help="besides the spool"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-queue-"))
    workdir.chmod(0o755)  # the database servers run as their own users
    try:
        import uvloop

        uvloop.run(main_async(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
