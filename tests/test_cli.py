"""``python -m gateway``'s command line: help and version instead of a server, and
``migrate``, which applies the schemas and exits."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from gateway.settings import VARIABLES

REPO = Path(__file__).resolve().parent.parent


def gateway(*arguments: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *arguments],
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_every_variable_and_starts_nothing(tmp_path: Path) -> None:
    done = gateway("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "migrate" in done.stdout
    for variable in VARIABLES:
        assert variable.name in done.stdout
    assert list(tmp_path.iterdir()) == []  # no database, no spool: nothing started


def test_version_prints_the_version(tmp_path: Path) -> None:
    done = gateway("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("mes-gateway ")


def test_migrate_creates_both_schemas_and_exits(tmp_path: Path) -> None:
    done = gateway("migrate", cwd=tmp_path, MES_SQLITE_PATH="history.db")
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(tmp_path / "history.db") as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert {"completions", "messages", "users", "api_keys"} <= tables
    assert not (tmp_path / "mes_spool").exists()  # no writer was started


def test_a_misconfiguration_stops_it_with_the_variables_name(tmp_path: Path) -> None:
    done = gateway("migrate", cwd=tmp_path, PORT="eighty")
    assert done.returncode != 0 and "PORT" in done.stderr


def test_a_writer_without_a_queue_says_so_and_starts_nothing(tmp_path: Path) -> None:
    done = gateway("writer", cwd=tmp_path)
    assert done.returncode != 0 and "MES_QUEUE is not set" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no spool, no database
