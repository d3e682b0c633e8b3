"""The gateway serves within a second of its start whatever state its databases are in, and
with ``MES_AUTO_MIGRATE=false`` it checks their schemas instead of changing them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


@contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never says a word: a database server that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
def test_a_database_that_hangs_holds_no_request_up_at_start(
    upstream: Any, scheme: str, tmp_path: Path
) -> None:
    with silent_server() as port:
        env = {
            "UPSTREAM_BASE_URL": upstream.base_url,
            "SQL_DSN": f"{scheme}://mes@127.0.0.1:{port}/mes",
            "DB_CONNECT_TIMEOUT": "120",  # each try hangs that long: start must not wait
        }
        gateway = GatewayProcess(env, tmp_path, set_up=False)
        with gateway.start(timeout=30):
            answer = httpx.post(gateway.base_url + "/chat/completions", json=CHAT, timeout=10)
            ready = httpx.get(gateway.url + "/readyz", timeout=10)
            log = gateway.log()
    assert answer.status_code == 200 and answer.json()["choices"]
    assert ready.status_code == 503 and ready.json()["set_up"] is False
    assert "slow to set up: serving" in log


def _gateway_command(
    *arguments: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_without_auto_migration_an_old_schema_stops_the_start_and_migrate_fixes_it(
    upstream: Any, tmp_path: Path
) -> None:
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "MES_SQLITE_PATH": str(tmp_path / "history.db"),
        "MES_AUTO_MIGRATE": "false",
    }
    refused = GatewayProcess(env, tmp_path)
    with pytest.raises(RuntimeError, match="gateway exited at start") as stopped:
        refused.start()
    assert "python -m gateway migrate" in str(stopped.value)
    migrated = _gateway_command("migrate", env={**refused.env}, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    with GatewayProcess(env, tmp_path) as gateway:
        assert httpx.post(gateway.base_url + "/chat/completions", json=CHAT).status_code == 200
        db = HistoryDB(env["MES_SQLITE_PATH"])
        try:
            assert await db.wait_for("completions", 1) == 1
        finally:
            await db.close()


def test_json_logs_are_one_object_a_line_naming_the_request_the_client_was_told_of(
    upstream: Any, tmp_path: Path
) -> None:
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "UPSTREAM_API_KEY": "sk-upstream-never-logged",
        "GATEWAY_KEYS": "gw-never-logged",
        "MES_SQLITE_PATH": str(tmp_path / "history.db"),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "debug",
    }
    key = {"Authorization": "Bearer gw-never-logged"}
    with GatewayProcess(env, tmp_path) as gateway:
        with httpx.Client(base_url=gateway.base_url, headers=key) as client:
            answered = client.post("/chat/completions", json={**CHAT, "stream": True})
            models = client.get("/models", headers={"X-Fake-Hang": "0"})
        gone = GatewayProcess({**env, "UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1"}, tmp_path)
        with gone, httpx.Client(base_url=gone.base_url, headers=key) as client:
            failed = client.post("/chat/completions", json=CHAT)
            log = gateway.log() + gone.log()
    request_id = failed.headers["x-gateway-request-id"]
    assert failed.status_code == 502 and len(request_id) == 16
    ids = {answered.headers["x-gateway-request-id"], models.headers["x-gateway-request-id"]}
    assert len(ids | {request_id}) == 3  # one each
    assert answered.headers["x-request-id"] == "req_fake"  # the upstream's, relayed beside it
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(line.get("request_id") == request_id for line in lines)  # its "unreachable"
    assert {line["logger"] for line in lines} >= {"mes.app", "uvicorn.error"}
    for said in ("never-logged", "hello"):
        assert said not in log
