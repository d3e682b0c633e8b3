"""How fast history is archived by retention and imported back, against capture's writer,
on each backend, in one run.

    python bench/archive.py [--backends sqlite,postgresql,mysql] [--records 100000]
                            [--turns 4] [--by-day] [--runs 3]

For each backend, in a throwaway database (a server with its durable defaults, or a SQLite
file): the gateway's writer process writes ``--records`` records spooled before it starts
(chat turns of ``--turns``-turn conversations, each resending the conversation so far,
as ``bench/writer.py --prefill --turns`` does): the baseline, capture's writer. Then
retention removes all of it with ``MES_ARCHIVE_DIR`` set (``retention.prune``, in steps of
``MES_RETENTION_STEP`` conversations, or whole days with ``--by-day``), and ``python -m
gateway import``'s importer loads the archive back into the emptied database; the counts are
checked equal. Rates are records per second over each phase's wall time, medians of
``--runs`` runs (each from an empty database), and the archive's bytes a record; each run
also says how much of retention's time went to the archive's own work (reading the
records back, rebuilding and compressing them, syncing the file) rather than removing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select  # noqa: E402

from bench.writer import PROMPT, database, record  # noqa: E402
from fake_upstream.responses import Answer  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.services import writer_config  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from storage import archive as archiving  # noqa: E402
from storage import retention  # noqa: E402
from storage.archive import Archive  # noqa: E402
from storage.database import create_engine  # noqa: E402
from storage.dsn import parse_dsn  # noqa: E402
from storage.partitions import partitions_in_use  # noqa: E402
from storage.restore import Importer  # noqa: E402
from storage.schema import completions  # noqa: E402
from storage.spool import Spool  # noqa: E402
from storage.writer_process import WriterProcess  # noqa: E402


async def write(settings: Settings, records: int, turns: int) -> float:
    """Capture's writer: ``records`` spooled, then written by a writer process; seconds
    from its start (the database already made) to the last record written."""
    answer = Answer(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}, 8
    ).completion()
    spool = Spool(Path(settings.spool_dir), settings.spool_max_bytes)
    spool.open()
    writer = WriterProcess(writer_config(settings), spool, Metrics())
    for n in range(records):
        writer.submit(record(n, answer, turns))
    started = time.perf_counter()
    writer.start()
    while writer.depth:  # noqa: ASYNC110 (a counter in another process's memory)
        await asyncio.sleep(0.02)
    seconds = time.perf_counter() - started
    await writer.close(5)
    return seconds


@contextmanager
def timed_archiving() -> Iterator[list[float]]:
    """Seconds retention spends in the archive's own work (reading records back, rebuilding,
    compressing, syncing), apart from removing them: ``[seconds]`` once done."""
    spent = [0.0]
    originals = archiving.keep, archiving.keep_day

    def timed(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def measured(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started

        return measured

    archiving.keep = timed(originals[0])  # type: ignore[assignment]
    archiving.keep_day = timed(originals[1])  # type: ignore[assignment]
    try:
        yield spent
    finally:
        archiving.keep, archiving.keep_day = originals


async def migrated(settings: Settings) -> None:
    spool = Spool(Path(settings.spool_dir), settings.spool_max_bytes)
    spool.open()
    writer = WriterProcess(writer_config(settings), spool, Metrics())
    writer.start()
    await writer.ready_event.wait()
    await writer.close(5)


async def one_run(
    dsn: str, workdir: Path, records: int, turns: int, by_day: bool
) -> dict[str, float]:
    shutil.rmtree(workdir / "spool", ignore_errors=True)
    shutil.rmtree(workdir / "archive", ignore_errors=True)
    settings = replace(
        Settings(),
        sql_dsn=dsn,
        spool_dir=str(workdir / "spool"),
        spool_max_bytes=2**36,
        mes_daily_partition=by_day,
    )
    await migrated(settings)
    wrote = await write(settings, records, turns)
    engine = create_engine(parse_dsn(dsn), pool_size=2)
    try:
        today = datetime.now(UTC).date()
        partitions = await partitions_in_use(engine, by_day, today)
        archive = Archive(workdir / "archive", "bench")
        tomorrow = datetime.combine(today + timedelta(days=1), datetime.min.time())
        started = time.perf_counter()
        with timed_archiving() as writing:
            run = await retention.prune(engine, tomorrow, 100, partitions, archive)
        archived = time.perf_counter() - started
        assert run.deleted.completions == records, run
        files = sorted(archive.root.glob("*.jsonl.gz"))
        size = sum(path.stat().st_size for path in files)
        started = time.perf_counter()
        tally = await Importer(engine, partitions).load(files)
        imported = time.perf_counter() - started
        assert (tally.stored, tally.skipped) == (records, 0), tally.problems[:5]
        async with engine.connect() as connection:
            stored = await connection.scalar(select(func.count()).select_from(completions))
        assert stored == records
        await retention.prune(engine, tomorrow, 1000, partitions)  # empty for the next run
    finally:
        await engine.dispose()
    return {
        "write": records / wrote,
        "archive": records / archived,
        "import": records / imported,
        "bytes": size / records,
        "import_s": imported,
        "archive_s": archived,
        "writing_s": writing[0],
    }


async def bench(backend: str, records: int, turns: int, by_day: bool, runs: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-archive-"))
    os.chmod(workdir, 0o755)  # the database servers run as their own users
    try:
        with database(backend, workdir) as (dsn, _server):
            results = []
            for n in range(runs):
                result = await one_run(dsn, workdir, records, turns, by_day)
                print(
                    f"  {backend} run {n + 1}: writer {result['write']:,.0f}/s, archive "
                    f"{result['archive']:,.0f}/s ({result['archive_s']:.1f} s, "
                    f"{result['writing_s']:.1f} s of it the archive's own work), import "
                    f"{result['import']:,.0f}/s ({result['import_s']:.1f} s), "
                    f"{result['bytes']:,.0f} archive bytes a record",
                    flush=True,
                )
                results.append(result)
            median = {k: statistics.median(r[k] for r in results) for k in results[0]}
            print(
                f"| {backend}{' by day' if by_day else ''} | {median['write']:,.0f} | "
                f"{median['archive']:,.0f} ({median['archive'] / median['write']:.1f}x) | "
                f"{median['import']:,.0f} ({median['import'] / median['write']:.1f}x) | "
                f"{median['bytes']:,.0f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql,mysql")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--by-day", action="store_true", help="MES_DAILY_PARTITION=true")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{args.records:,} records ({args.turns}-turn conversations), medians of {args.runs} "
        f"runs, records/s (against the writer)\n"
        "| backend | capture's writer | archive (retention) | import | archive bytes/record |\n"
        "|---|---|---|---|---|"
    )
    for backend in args.backends.split(","):
        asyncio.run(bench(backend, args.records, args.turns, args.by_day, args.runs))


if __name__ == "__main__":
    os.environ.setdefault("MES_LOG_LEVEL", "warning")
    main()
