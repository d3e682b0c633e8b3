"""How fast history is read back at scale, through the gateway's HTTP APIs.

Fills a history database with N completions (default 100,000: 200,000 messages) written as
the gateway writes them, starts the gateway on it, and times, as medians of several runs:
a full-text search for an English, a Chinese and a Japanese phrase (a user's messages, and
everyone's), a user's latest 50 completions (admin API and OpenAI's list endpoint), a page
of everyone's completions and conversations (newest and oldest first), one
day's statistics and all history's by day, and a streamed fine-tuning export of everything
(with the gateway's RSS growth). With ``--partitioned`` the history is split by day
(``MES_DAILY_PARTITION=true``) before it is filled: completions 20 s apart make ~4,300 a day.

    python bench/history_reads.py [--backend sqlite|postgresql|mysql] [--total 100000]
        [--runs 5] [--partitioned] [--dsn DSN] [--lists]

``--dsn`` measures a database filled before as this command fills one (``fill``, with the
same ``--total``) instead of filling a new one; ``--lists`` times the pages of lists alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fake_upstream.testing import serve  # noqa: E402
from storage.database import create_engine, ensure_database, migrate  # noqa: E402
from storage.partitions import Partitions  # noqa: E402
from tests import bulk  # noqa: E402
from tests.dbservers import start_mariadb, start_postgres  # noqa: E402
from tests.managed import ADMIN, managed_gateway, new_member  # noqa: E402
from tests.test_history_at_scale import PeakRSS  # noqa: E402


async def fill(dsn: str, total: int, partitioned: bool) -> float:
    engine = create_engine(await ensure_database(dsn), pool_size=1)
    try:
        await migrate(engine, "history")
        if partitioned:
            partitions = Partitions(engine)
            await partitions.setup(datetime.now(UTC).date())
            first, last = bulk.span(total)
            await partitions.ensure(
                first.date() + timedelta(days=n) for n in range((last - first).days + 2)
            )
        started = time.perf_counter()
        await bulk.fill(engine, total)
        seconds = time.perf_counter() - started
        # As a live database would be: its planner statistics up to date (autovacuum's job).
        async with engine.begin() as connection:
            if connection.dialect.name == "mysql":
                await connection.execute(text("ANALYZE TABLE completions, conversations, messages"))
            else:
                await connection.execute(text("ANALYZE"))
        return seconds
    finally:
        await engine.dispose()


def median_ms(runs: int, call: Callable[[], httpx.Response]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = call()
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return statistics.median(times)


def measure(
    dsn: str, total: int, runs: int, backend: str, partitioned: bool, *, filled: bool, lists: bool
) -> None:
    how = (
        "there before"
        if filled
        else f"written in {asyncio.run(fill(dsn, total, partitioned)):.1f} s"
    )
    print(
        f"backend {backend}{', split by day' if partitioned else ''}: {total:,} completions "
        f"({2 * total:,} messages) {how}\n"
    )
    rows: list[tuple[str, str]] = []
    extra = {"MES_DAILY_PARTITION": "true"} if partitioned else {}
    workdir = Path(tempfile.mkdtemp())
    with serve() as upstream, managed_gateway(upstream, dsn, workdir, **extra) as gateway:
        admin = httpx.Client(base_url=gateway.url + "/admin", headers=ADMIN, timeout=300)
        for name, phrase in bulk.PHRASES.items() if not lists else ():
            for scope, extra in (("one user", {"user_id": bulk.OWNER}), ("everyone", {})):
                params: dict[str, Any] = {"q": phrase, "limit": 20, **extra}
                ms = median_ms(runs, lambda p=params: admin.get("/search", params=p))
                rows.append((f"search {name} ({scope})", f"{ms:8.1f} ms"))
        latest = median_ms(
            runs, lambda: admin.get(f"/users/{bulk.OWNER}/completions", params={"limit": 50})
        )
        rows.append(("a user's latest 50 completions (admin)", f"{latest:8.1f} ms"))
        for listed in ("completions", "conversations"):
            for order in ("desc", "asc"):
                page = {"limit": 50, "order": order}
                ms = median_ms(runs, lambda p=page, n=listed: admin.get(f"/{n}", params=p))
                rows.append((f"everyone's {listed}, a page of 50, {order}", f"{ms:8.1f} ms"))
        if lists:
            _print(rows)
            return
        first, _ = bulk.span(total)
        one_day = {
            "by": "model",
            "since": (first + timedelta(days=1)).date().isoformat() + "T00:00:00Z",
            "until": (first + timedelta(days=2)).date().isoformat() + "T00:00:00Z",
        }
        a_day = median_ms(runs, lambda: admin.get("/stats", params=one_day))
        rows.append(("statistics of one day, by model", f"{a_day:8.1f} ms"))
        day = median_ms(runs, lambda: admin.get("/stats", params={"by": "day"}))
        rows.append(("statistics by day, all history", f"{day:8.1f} ms"))
        member = new_member(gateway, "reader")
        reader = httpx.Client(
            base_url=gateway.base_url, headers={"Authorization": f"Bearer {member.key}"}
        )
        sdk_list = median_ms(
            runs, lambda: reader.get("/chat/completions", params={"limit": 50, "order": "desc"})
        )
        rows.append(("GET /v1/chat/completions, 50 (a user with none)", f"{sdk_list:8.1f} ms"))
        assert gateway.process is not None
        sampler = PeakRSS(gateway.process.pid)
        baseline = sampler.peak
        sampler.start()
        started = time.perf_counter()
        lines = 0
        params = {"format": "fine-tuning", "user_id": bulk.OWNER}
        with admin.stream("GET", "/export", params=params) as response:
            for line in response.iter_lines():
                lines += bool(line)
        seconds = time.perf_counter() - started
        growth = (sampler.stop() - baseline) / 2**20
        rows.append(
            (
                f"export {lines:,} lines (fine-tuning JSONL)",
                f"{seconds:8.1f} s  ({lines / seconds:,.0f} lines/s, RSS +{growth:.1f} MiB)",
            )
        )
    _print(rows)


def _print(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "mysql"), default="sqlite")
    parser.add_argument("--total", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--partitioned", action="store_true", help="MES_DAILY_PARTITION=true")
    parser.add_argument("--dsn", help="a database filled before: measured, not filled")
    parser.add_argument("--lists", action="store_true", help="time the pages of lists alone")
    args = parser.parse_args()
    options = {"filled": args.dsn is not None, "lists": args.lists}
    if args.dsn:
        measure(args.dsn, args.total, args.runs, args.backend, args.partitioned, **options)
        return
    with throwaway_database(args.backend, "bench_reads") as dsn:
        measure(dsn, args.total, args.runs, args.backend, args.partitioned, **options)


@contextmanager
def throwaway_database(backend: str, name: str) -> Iterator[str]:
    """A DSN for a fresh history database: an SQLite file, or a database on a PostgreSQL or
    MariaDB server started for the run and stopped after it.

    MariaDB gets a 1 GiB buffer pool, as a server holding such a history would be given:
    with its 128 MiB default (less than the ~200 MB of 100,000 completions), a scan of the
    messages (search) overflowed the part of the pool a scan may use and read ~3,000 pages
    from disk each time (InnoDB reads with O_DIRECT: not even from the OS's cache), where
    PostgreSQL reads through the OS's cache."""
    if backend == "sqlite":
        yield str(Path(tempfile.mkdtemp(prefix="mes-bench-")) / "history.db")
        return
    base = Path(tempfile.mkdtemp(prefix=f"mes-bench-{backend}-"))
    server = (
        start_postgres(base) if backend == "postgresql" else start_mariadb(base, buffer_pool="1G")
    )
    try:
        yield server.url(name)
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
