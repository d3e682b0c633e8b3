"""Shared fixtures: the fake upstream, real PostgreSQL and MariaDB servers, and the gateway.

Every database backend runs in CI (``CI=true``): a missing server fails there. On a
developer's machine without the server binaries, those backends are skipped.

Two tiers. The slow tier is every test that uses a real server (the fake upstream on a
socket, a gateway process, PostgreSQL, MariaDB) or load, outages and kills: marked ``slow``
here, by the fixtures and backends it uses, or by its module's ``pytestmark``. The rest, the
fast tier, runs in this process on SQLite in a temporary folder; ``--fast`` runs it alone.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fake_upstream.testing import serve
from tests.dbservers import DatabaseServer, start_mariadb, start_postgres
from tests.history_db import HistoryDB

IN_CI = os.environ.get("CI", "").lower() == "true"
BACKENDS = ("sqlite", "postgresql", "mysql")
SERVERS = frozenset({"upstream", "postgres", "mariadb"})  # fixtures that start a real server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast", action="store_true", help="run the fast tier only: skip tests marked slow"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: the slow tier: real servers, database servers, load, outages"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(item, "callspec", None)
        on_a_server = params is not None and any(
            value in ("postgresql", "mysql") for value in params.params.values()
        )
        if on_a_server or SERVERS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--fast"):
        kept = [item for item in items if item.get_closest_marker("slow") is None]
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: every backend must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def upstream() -> Iterator[object]:
    with serve() as served:
        yield served


def _server(kind: str) -> DatabaseServer:
    starter = start_postgres if kind == "postgresql" else start_mariadb
    # Not under pytest's tmp folder: the server runs as its own user, who cannot enter it.
    base = Path(tempfile.mkdtemp(prefix=f"mes-test-{kind}-"))
    try:
        return starter(base)
    except Exception as error:  # binaries missing or the server would not start
        unavailable(f"{kind} server unavailable: {error}")
        raise


@pytest.fixture(scope="session")
def postgres() -> Iterator[DatabaseServer]:
    server = _server("postgresql")
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def mariadb() -> Iterator[DatabaseServer]:
    server = _server("mysql")
    yield server
    server.shutdown()


def database_dsn(request: pytest.FixtureRequest, kind: str, tmp_path: Path, prefix: str) -> str:
    """A DSN naming a database that does not exist yet (the gateway creates it)."""
    if kind == "sqlite":
        return str(tmp_path / f"{prefix}.db")
    server: DatabaseServer = request.getfixturevalue(
        "postgres" if kind == "postgresql" else "mariadb"
    )
    name = server.new_database_name(prefix)
    request.addfinalizer(lambda: server.drop_database(name))
    return server.url(name)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def history_dsn(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    return database_dsn(request, backend, tmp_path, "history")


@pytest.fixture
async def history(history_dsn: str) -> AsyncIterator[HistoryDB]:
    db = HistoryDB(history_dsn)
    yield db
    await db.close()
