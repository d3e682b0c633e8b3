"""Two gateway processes share a spool directory, each in its own slot; both are killed and
only one comes back: it writes the records of both. A writer process never outlives its
gateway on a slot."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from gateway.services import writer_config
from gateway.settings import Settings
from storage.writer_process import SharedState
from tests.gateway_process import REPO, GatewayProcess, free_port
from tests.history_db import HistoryDB

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


async def test_a_dead_processs_spool_slot_is_taken_over(upstream: Any, tmp_path: Path) -> None:
    history = str(tmp_path / "history.db")
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": history,
        "MES_SPOOL_DIR": str(tmp_path / "spool"),
    }
    # Nothing is written before the kill: the first two have a database that refuses them.
    refused = {**env, "SQL_DSN": f"postgresql://mes@127.0.0.1:{free_port()}/mes"}
    first = GatewayProcess(refused, tmp_path / "a").start()
    second = GatewayProcess(refused, tmp_path / "b").start()
    answered = []
    try:
        for n, gateway in enumerate([first, second] * 20):
            body = {**CHAT, "user": f"u{n}"}
            assert httpx.post(gateway.base_url + "/chat/completions", json=body).is_success
            answered.append(f"u{n}")
    finally:
        for gateway in (first, second):
            assert gateway.process is not None
            os.kill(gateway.process.pid, signal.SIGKILL)
            gateway.process.wait()
    slots = sorted(p.name for p in (tmp_path / "spool").glob("slot-*"))
    assert slots == ["slot-0", "slot-1"]

    with GatewayProcess(env, tmp_path / "c") as survivor:
        db = HistoryDB(history)
        try:
            assert await db.wait_for("completions", 40) == 40
            users = Counter(row["end_user"] for row in await db.completions())
        finally:
            await db.close()
        metrics = httpx.get(survivor.url + "/metrics").text
    assert sorted(users) == sorted(answered) and set(users.values()) == {1}
    # Its own slot's 20 are replayed; the dead process's 20 adopted, and not replayed too.
    assert "mes_records_adopted_total 20" in metrics
    assert "mes_records_replayed_total 20" in metrics


def test_a_writer_whose_gateway_died_while_it_started_stops_at_once(tmp_path: Path) -> None:
    """The kernel is asked to stop the writer with its gateway only once the writer has
    imported what it needs; a gateway killed before that left its writer running, with no
    lock on the slot it wrote from. Such a writer now sees it has another parent, and
    stops before it touches the slot or the database."""
    state = SharedState.create()
    config = writer_config(Settings.from_env({"MES_SQLITE_PATH": str(tmp_path / "h.db")}))
    settings = pickle.dumps(config)
    gone = "1"  # not the pid of this writer's parent (the test)
    slot = tmp_path / "spool" / "slot-0"
    writer = subprocess.run(
        [sys.executable, "-m", "storage.writer_process", str(slot), str(state.fd), gone],
        input=len(settings).to_bytes(8, "big") + settings,
        pass_fds=(state.fd,),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
    )
    assert writer.returncode == 1
    assert b"the gateway that started this writer is gone" in writer.stderr
    assert not (tmp_path / "h.db").exists() and not slot.exists()


def test_a_restarted_gateway_counts_the_records_it_found_spooled_as_waiting(
    upstream: Any, tmp_path: Path
) -> None:
    """``/readyz``'s ``queue_depth`` is what the spool holds unwritten, also what a gateway
    killed before it could write them left there."""
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": f"postgresql://mes@127.0.0.1:{free_port()}/mes",  # refuses: nothing written
        "MES_SPOOL_DIR": str(tmp_path / "spool"),
    }
    first = GatewayProcess(env, tmp_path / "a", set_up=False).start()
    try:
        for n in range(12):
            body = {**CHAT, "user": f"u{n}"}
            assert httpx.post(first.base_url + "/chat/completions", json=body).is_success
        assert httpx.get(first.url + "/readyz").json()["queue_depth"] == 12
    finally:
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
    with GatewayProcess(env, tmp_path / "b", set_up=False) as second:
        assert httpx.post(second.base_url + "/chat/completions", json=CHAT).is_success
        ready = httpx.get(second.url + "/readyz").json()
    assert ready["queue_depth"] == 13 and ready["spool_bytes"] > 0
