"""History and main databases of different kinds, named by the DSNs New API users have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import inspect, text

from storage.database import create_engine
from storage.dsn import parse_dsn
from tests.dbservers import DatabaseServer
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB


async def tables_and_keys(dsn: str) -> tuple[set[str], int]:
    engine = create_engine(parse_dsn(dsn), pool_size=1)
    try:
        async with engine.connect() as connection:
            tables = set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
            keys = 0
            if "api_keys" in tables:
                keys = int(await connection.scalar(text("SELECT COUNT(*) FROM api_keys")) or 0)
            return tables, keys
    finally:
        await engine.dispose()


async def test_mariadb_main_and_postgres_history_from_new_api_style_dsns(
    upstream: Any, postgres: DatabaseServer, mariadb: DatabaseServer, tmp_path: Path
) -> None:
    main_name = mariadb.new_database_name("oneapi")
    history_name = postgres.new_database_name("oneapi_messages")
    # The forms New API documents, verbatim; neither database exists yet.
    main_dsn = f"{mariadb.user}:{mariadb.password}@tcp(127.0.0.1:{mariadb.port})/{main_name}"
    history_dsn = f"postgres://{postgres.user}@127.0.0.1:{postgres.port}/{history_name}"
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "UPSTREAM_API_KEY": "sk-up",
        "GATEWAY_KEYS": "gw-one,gw-two",
        "SQL_DSN": main_dsn,
        "MES_SQL_DSN": history_dsn,
    }
    try:
        with GatewayProcess(env, tmp_path) as gateway:
            for index in range(5):
                response = httpx.post(
                    gateway.base_url + "/chat/completions",
                    headers={"Authorization": "Bearer gw-one"},
                    json={
                        "model": "gpt-4o-mini",
                        "stream": index % 2 == 0,
                        "messages": [{"role": "user", "content": f"数据库 {index}"}],
                    },
                )
                assert response.status_code == 200
            history = HistoryDB(history_dsn)
            try:
                assert await history.wait_for("completions", 5) == 5
            finally:
                await history.close()
            ready = httpx.get(gateway.url + "/readyz").json()
            assert ready["databases"] == {"main": "ok", "history": "ok"}
        main_tables, key_rows = await tables_and_keys(main_dsn)
        history_tables, _ = await tables_and_keys(history_dsn)
        assert key_rows == 2
        assert "completions" not in main_tables and "api_keys" in main_tables
        assert {"completions", "messages", "conversations", "request_logs"} <= history_tables
        assert "api_keys" not in history_tables
    finally:
        mariadb.drop_database(main_name)
        postgres.drop_database(history_name)


async def test_a_restart_on_an_existing_database_keeps_its_history(
    upstream: Any, history_dsn: str, history: HistoryDB, tmp_path: Path
) -> None:
    env = {"UPSTREAM_BASE_URL": upstream.base_url, "SQL_DSN": history_dsn}
    body = {"model": "m", "messages": [{"role": "user", "content": "persist me"}]}
    for _ in range(2):
        with GatewayProcess(env, tmp_path) as gateway:
            assert httpx.post(gateway.base_url + "/chat/completions", json=body).status_code == 200
    assert await history.wait_for("completions", 2) == 2
