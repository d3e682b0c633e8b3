"""How long MariaDB takes to apply history_0011 (times and costs to DOUBLE, the by-day
tables' models compared byte for byte) to a history of a million completions.

    python bench/mysql_upgrade.py --completions 1000000

Starts a throwaway MariaDB (as the tests do), migrates a database to history_0010, fills it
with ``--completions`` completions (each a conversation of two messages, as
``tests/bulk.py`` writes them, with their usage by day), then times the upgrade to the
newest revision, and checks what it kept.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.database import create_engine, ensure_database, migrate  # noqa: E402
from storage.schema import completions  # noqa: E402
from tests.bulk import fill  # noqa: E402
from tests.dbservers import start_mariadb  # noqa: E402


async def measure(dsn: str, total: int) -> None:
    engine = create_engine(await ensure_database(dsn), pool_size=2)
    try:
        await migrate(engine, "history", "history_0010")
        began = time.perf_counter()
        await fill(engine, total)
        filled = time.perf_counter() - began
        async with engine.connect() as connection:
            before = await connection.scalar(select(func.sum(completions.c.latency_ms)))
            kind = await connection.scalar(
                text(
                    "SELECT DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
                    "DATABASE() AND TABLE_NAME = 'completions' AND COLUMN_NAME = 'latency_ms'"
                )
            )
        print(f"filled {total:,} completions in {filled:.0f} s; latency_ms is {kind}")
        began = time.perf_counter()
        await migrate(engine, "history")
        took = time.perf_counter() - began
        async with engine.connect() as connection:
            after = await connection.scalar(select(func.sum(completions.c.latency_ms)))
            count = await connection.scalar(select(func.count()).select_from(completions))
            kind = await connection.scalar(
                text(
                    "SELECT DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
                    "DATABASE() AND TABLE_NAME = 'completions' AND COLUMN_NAME = 'latency_ms'"
                )
            )
        print(
            f"history_0010 -> history_0011: {took:.1f} s for {count:,} completions "
            f"({count / took:,.0f} rows/s); latency_ms is now {kind}; sum of latencies "
            f"{before:.1f} before, {after:.1f} after"
        )
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mes-bench-upgrade-") as folder:
        Path(folder).chmod(0o755)
        server = start_mariadb(Path(folder), buffer_pool="1G")
        try:
            asyncio.run(measure(server.url("mes_upgrade"), args.completions))
        finally:
            server.shutdown()


if __name__ == "__main__":
    main()
