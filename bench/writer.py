"""How many records per second the capture pipeline writes into each history database.

    python bench/writer.py --backend postgresql [--rate 10000] [--seconds 60] [--turns 1]
                           [--prompt-bytes 984] [--prefill]

Runs the gateway's own writer as the gateway does (``storage/writer_process.py``: a process
of its own following the spool slot this process appends to), against a throwaway database
server with its durable defaults (or a SQLite file), and feeds it at a fixed rate the
records the proxy would hand it: non-streamed chat completions with a ~1 KB prompt, each a
new conversation (a conversation, a completion and three messages per record). With
``--turns N``, records are the turns of conversations N turns long, each request resending
the conversation so far as a chat client does (turn k holds 2k messages and its answer),
the turns of ``SPREAD`` conversations interleaved, so that a turn's history was written in
an earlier batch. Prints, once a second, what was submitted and written and the backlog
(records not yet written, bytes in the spool), then the rate sustained: records written
over the time from the first submit until the writer had written everything, and the CPU
each record cost the writer process and the database server over that time (read from
``/proc``: the server's processes, those that ended meanwhile included; SQLite works in the
writer's process). With ``--prefill``, the records (rate x seconds of them) are spooled
first and the writer started then: what it writes alone, the records' producer (this
process, which shapes and spools them as the gateway would) not on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

# The code measured: this checkout's, or another's (``bench/writer_ab.py`` runs this harness
# from the other checkout's folder, which the writer process it starts imports from).
sys.path.insert(0, os.environ.get("MES_BENCH_CODE") or str(Path(__file__).resolve().parent.parent))

from bench.speed import FILLER  # noqa: E402
from capture.chat import ChatExchange  # noqa: E402
from fake_upstream.responses import Answer  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.services import writer_config  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from storage.spool import Spool  # noqa: E402
from storage.writer_process import WriterProcess  # noqa: E402

SPREAD = 1000  # --turns: conversations whose turns are interleaved
PROMPT = FILLER * 6  # ~1 KB; --prompt-bytes sets another size


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[tuple[str, int | None]]:
    """The DSN of a throwaway history database, and its server's process id (None: SQLite)."""
    if backend == "sqlite":
        yield str(workdir / "history.db"), None
        return
    from tests.dbservers import start_mariadb, start_postgres

    start = start_postgres if backend == "postgresql" else start_mariadb
    server = start(workdir / backend, durable=True)
    try:
        if server.process is not None:  # MariaDB: one process
            pid = server.process.pid
        else:  # PostgreSQL: the postmaster, whose children serve the connections
            pid = int((server.base / "data" / "postmaster.pid").read_text().split()[0])
        yield server.url("mes_bench_writer"), pid
    finally:
        server.shutdown()


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None, children: bool = False) -> float:
    """CPU seconds process ``pid`` has used; with ``children``, its children's too, live
    (their own) and ended (counted in the parent's ``cutime``/``cstime``)."""
    if pid is None:
        return 0.0
    fields = _stat(pid)
    used = sum(int(fields[i]) for i in (11, 12, 13, 14) if children or i < 13)
    if children:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    child = _stat(int(entry.name))
                except OSError:
                    continue
                if int(child[1]) == pid:
                    used += int(child[11]) + int(child[12])
    return used / TICKS


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: state, ppid, ... (``[11]``
    is utime, ``[12]`` stime, ``[13]`` cutime, ``[14]`` cstime)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def record(n: int, answer: bytes, turns: int = 1, prompt: str = PROMPT) -> ChatExchange:
    """Record ``n``: turn ``n // SPREAD % turns`` of a conversation (the first, if turns is
    1), with the answer ``answer`` to each question of its history."""
    conversation = f"{n // (SPREAD * turns)}-{n % SPREAD}"
    said = _message(answer)
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    for turn in range(n // SPREAD % turns + 1):
        if turn:
            messages.append(said)
        question = f"Question {conversation}/{turn}: summarise this. {prompt}"
        messages.append({"role": "user", "content": question})
    request = {"model": "gpt-4o-mini", "messages": messages, "user": f"user-{n % 50}"}
    return ChatExchange(
        owner="bench",
        key_fingerprint=None,
        client_ip="127.0.0.1",
        user_agent="bench/1",
        conversation_header=None,
        request=request,
        stream=False,
        started_at=datetime.now(UTC).replace(tzinfo=None),
        status=200,
        response_body=answer,
        first_byte_ms=1.0,
        latency_ms=1.2,
    )


@functools.cache
def _message(answer: bytes) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(answer)["choices"][0]["message"]
    return message


async def started_writer(settings: Settings) -> tuple[Spool, WriterProcess]:
    """A new spool in ``settings.spool_dir`` and a writer process following it, started,
    its database made and migrated."""
    spool = Spool(Path(settings.spool_dir), settings.spool_max_bytes)
    spool.open()
    writer = WriterProcess(writer_config(settings), spool, Metrics())
    writer.start()
    await writer.ready_event.wait()
    return spool, writer


async def run(
    dsn: str,
    server: int | None,
    rate: int,
    seconds: float,
    turns: int,
    workdir: Path,
    prompt: str = PROMPT,
    prefill: bool = False,
) -> None:
    settings = replace(
        Settings(),
        sql_dsn=dsn,
        spool_dir=str(workdir / "spool"),
        spool_max_bytes=2**36,
        capture_batch_size=int(os.environ.get("MES_BATCH_SIZE", "200")),
        # The writer at its gateway's priority: the producer here is this harness, not
        # requests, and what is measured is what the writer can do (an older checkout's
        # settings, under bench/writer_ab.py, have no such field).
        **({"writer_nice": 0} if "writer_nice" in Settings.__dataclass_fields__ else {}),
    )
    answer = Answer(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}, 8
    ).completion()
    metrics = Metrics()
    if prefill:  # the database made and migrated by a writer of its own first
        spool = Spool(Path(settings.spool_dir), settings.spool_max_bytes)
        spool.open()
        first = WriterProcess(writer_config(settings), spool, metrics)
        first.start()
        await first.ready_event.wait()
        await first.close(5)
    spool = Spool(Path(settings.spool_dir), settings.spool_max_bytes)
    spool.open()
    writer = WriterProcess(writer_config(settings), spool, metrics)
    if prefill:
        for n in range(int(rate * seconds)):
            writer.submit(record(n, answer, turns, prompt))
        print(f"{int(rate * seconds)} records spooled before the writer starts")
    writer.start()
    await writer.ready_event.wait()  # the database made and migrated

    def written() -> int:
        return writer.state["records_written"]

    assert writer.process is not None
    writer_pid = writer.process.pid
    print(f"{'s':>4}{'submitted':>11}{'written':>10}{'backlog':>11}{'spooled MiB':>13}")
    cpu_before = cpu_seconds(writer_pid), cpu_seconds(server, children=True)
    written_before = written()
    started = time.perf_counter()
    submitted = 0
    next_report = 1.0
    peak_backlog = 0
    while not prefill and (elapsed := time.perf_counter() - started) < seconds:
        due = int(elapsed * rate)
        while submitted < due:
            writer.submit(record(submitted, answer, turns, prompt))
            submitted += 1
        peak_backlog = max(peak_backlog, writer.depth)
        if elapsed >= next_report:
            print(
                f"{next_report:>4.0f}{submitted:>11}{written():>10}"
                f"{writer.depth:>11}{spool.pending_bytes / 2**20:>13.1f}",
                flush=True,
            )
            next_report += 1.0
        await asyncio.sleep(0.005)
    while writer.depth:  # noqa: ASYNC110 (polls a counter in another process's memory)
        await asyncio.sleep(0.05)
    total = time.perf_counter() - started
    writer_cpu = cpu_seconds(writer_pid) - cpu_before[0]
    server_cpu = cpu_seconds(server, children=True) - cpu_before[1]
    failed = writer.state["records_failed"]
    count = max(1, written() - written_before)
    print(
        f"{'spooled first' if prefill else f'offered {rate}/s for {seconds:.0f} s'}: "
        f"{written()} written, {failed} failed, "
        f"in {total:.1f} s: {written() / total:.0f} records/s sustained; "
        f"peak backlog {peak_backlog} records\n"
        f"CPU a record: writer {writer_cpu / count * 1e6:.0f} us, database "
        f"{server_cpu / count * 1e6:.0f} us, "
        f"together {(writer_cpu + server_cpu) / count * 1e6:.0f} us"
    )
    await writer.close(5)
    sizes = await stored_bytes(dsn)
    total = sum(sizes.values())
    print(
        f"stored: {total / 2**20:.1f} MiB, {total / count:,.0f} bytes a record ("
        + ", ".join(f"{name} {size / count:,.0f}" for name, size in sorted(sizes.items()))
        + "; tables and their indexes)"
    )


async def stored_bytes(dsn: str) -> dict[str, int]:
    """The bytes each history table takes on disk, its indexes included: the database's
    own count (PostgreSQL's; MariaDB's, after ANALYZE), or SQLite's pages."""
    from sqlalchemy import text

    from storage.database import create_engine
    from storage.dsn import parse_dsn

    engine = create_engine(parse_dsn(dsn), pool_size=1, max_overflow=0)
    tables = ("completions", "conversations", "messages", "usage_daily", "latency_daily")
    sizes: dict[str, int] = {}
    try:
        async with engine.connect() as connection:
            kind = connection.dialect.name
            for table in tables:
                if kind == "postgresql":
                    query = f"SELECT pg_total_relation_size('{table}')"
                elif kind == "mysql":
                    await connection.exec_driver_sql(f"ANALYZE TABLE {table}")
                    query = (
                        "SELECT data_length + index_length FROM information_schema.tables "
                        f"WHERE table_schema = DATABASE() AND table_name = '{table}'"
                    )
                else:
                    query = (
                        "SELECT sum(pgsize) FROM dbstat WHERE name IN "
                        f"(SELECT name FROM sqlite_master WHERE tbl_name = '{table}')"
                    )
                sizes[table] = int((await connection.execute(text(query))).scalar() or 0)
    finally:
        await engine.dispose()
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "mysql"], default="sqlite")
    parser.add_argument("--rate", type=int, default=10_000, help="records offered per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--turns", type=int, default=1, help="turns a conversation lasts (1: each record new)"
    )
    parser.add_argument(
        "--prefill",
        action="store_true",
        help="spool RATE x SECONDS records first, then start the writer: what it writes "
        "alone, without the records' producer on the same cores",
    )
    parser.add_argument(
        "--prompt-bytes", type=int, default=len(PROMPT), help="size of each question's text"
    )
    args = parser.parse_args()
    prompt = (FILLER * (args.prompt_bytes // len(FILLER) + 1))[: args.prompt_bytes]
    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-writer-"))
    workdir.chmod(0o755)  # the database servers run as their own users
    try:
        with database(args.backend, workdir) as (dsn, server):
            import uvloop

            uvloop.run(
                run(dsn, server, args.rate, args.seconds, args.turns, workdir, prompt, args.prefill)
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
