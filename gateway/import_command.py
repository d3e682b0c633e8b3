"""``python -m gateway import FILE...``: exports and archives loaded back into the history
database the environment names (``MES_SQL_DSN``, else ``SQL_DSN``, else the local SQLite
file), whatever its backend and layout: the way to restore an archive, and to move from
one database to another (export from one, import into the other).

The schema is created or upgraded first (unless ``MES_AUTO_MIGRATE=false``); redaction
patterns and ``MES_CAPTURE_CONTENT=false`` apply as they do to captured records. On a
terminal, progress is shown as it goes; a summary ends it, and every line skipped is
listed with its file and line number. The exit status is 1 when a line was skipped, an
archive's manifest did not match or a compressed file was cut short, 0 otherwise.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from capture.redaction import Redactor
from gateway.settings import Settings
from storage.database import create_engine, prepare_schema
from storage.dsn import parse_dsn
from storage.partitions import partitions_in_use
from storage.restore import Importer, Tally

SHOWN_PROBLEMS = 50


async def run(settings: Settings, paths: list[Path], out: TextIO = sys.stdout) -> int:
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        print(f"mes-gateway import: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    dsn = settings.history_dsn
    engine = create_engine(parse_dsn(dsn), pool_size=2, connect_timeout=settings.db_connect_timeout)
    try:
        await prepare_schema(
            engine,
            dsn,
            "history",
            auto_migrate=settings.auto_migrate,
            connect_timeout=settings.db_connect_timeout,
        )
        today = datetime.now(UTC).date()
        partitions = await partitions_in_use(engine, settings.mes_daily_partition, today)
        redactor = Redactor(settings.redact_patterns, capture_content=settings.capture_content)
        shown = _Progress(sys.stderr) if sys.stderr.isatty() else None
        importer = Importer(engine, partitions, redactor, report=shown)
        tally = await importer.load(paths)
        if shown is not None:
            shown.end()
    finally:
        await engine.dispose()
    _summary(tally, out)
    return 1 if tally.skipped or tally.mismatched or tally.damaged else 0


def _summary(tally: Tally, out: TextIO) -> None:
    seconds = time.monotonic() - tally.started
    print(
        f"imported {tally.files} file(s), {tally.lines:,} lines, {tally.bytes / 1e6:,.1f} MB "
        f"in {seconds:,.1f} s ({tally.rate():,.0f} records/s): {tally.stored:,} records "
        f"stored, {tally.present:,} already there, {tally.erased:,} of erased owners "
        f"dropped, {tally.skipped:,} lines skipped; {tally.manifests} archive manifest(s) "
        "checked",
        file=out,
    )
    for problem in tally.problems[:SHOWN_PROBLEMS]:
        print(f"  {problem}", file=out)
    if len(tally.problems) > SHOWN_PROBLEMS:
        print(f"  ... and {len(tally.problems) - SHOWN_PROBLEMS} more", file=out)


class _Progress:
    """A line on the terminal, rewritten at most twice a second."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last = 0.0

    def __call__(self, tally: Tally) -> None:
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        self.out.write(
            f"\r{tally.records:,} records ({tally.stored:,} new), {tally.rate():,.0f} "
            f"records/s, {tally.bytes / 1e6:,.1f} MB read, {tally.skipped:,} skipped "
        )
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()
