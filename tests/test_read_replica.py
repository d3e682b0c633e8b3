"""``MES_SQL_READ_DSN``: the read APIs and the viewer read a replica of the history database,
while capture, updates, deletions and migrations go to the primary. PostgreSQL streaming
replication on loopback: a primary, and a hot standby made from it by ``pg_basebackup``.
The standby's replay is paused to tell the two apart: what the primary stores meanwhile
is there, and not on the replica the read APIs answer from."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import unavailable
from tests.dbservers import DatabaseServer, start_postgres, start_postgres_standby
from tests.gateway_process import free_port, until
from tests.managed import ADMIN, Member, managed_gateway, new_member

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicated() -> Iterator[tuple[DatabaseServer, DatabaseServer]]:
    servers: list[DatabaseServer] = []
    try:
        servers.append(start_postgres(Path(tempfile.mkdtemp(prefix="mes-test-primary-"))))
        standby = Path(tempfile.mkdtemp(prefix="mes-test-standby-"))
        servers.append(start_postgres_standby(servers[0], standby))
    except Exception as error:  # binaries missing, or a server would not start
        for server in servers:
            server.shutdown()
        unavailable(f"a replicated PostgreSQL would not start: {error}")
    yield servers[0], servers[1]
    for server in reversed(servers):
        server.shutdown()


def chat(gateway: Any, member: Member, words: str) -> None:
    sent = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {member.key}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}]},
        timeout=30,
    )
    assert sent.status_code == 200, sent.text


def test_reads_come_from_the_replica_and_writes_go_to_the_primary(
    upstream: Any, replicated: tuple[DatabaseServer, DatabaseServer], tmp_path: Path
) -> None:
    primary, standby = replicated
    name = primary.new_database_name("mes_replica")
    replica = standby.url(name)
    with (
        managed_gateway(upstream, primary.url(name), tmp_path, MES_SQL_READ_DSN=replica) as gw,
        httpx.Client(base_url=gw.url + "/admin", headers=ADMIN, timeout=30) as admin,
        httpx.Client(base_url=gw.url, timeout=30) as plain,
    ):
        member = new_member(gw, "reader")
        own = {"Authorization": f"Bearer {member.key}"}

        def listed() -> list[dict[str, Any]]:
            found = admin.get("/completions")
            return found.json()["data"] if found.status_code == 200 else []

        def stored_on_primary() -> int:
            return int(primary.sql("SELECT count(*) FROM completions", database=name))

        chat(gw, member, "first words about herons")
        first = until(
            lambda: listed(), tolerating=(httpx.HTTPError,)
        )  # once the replica has replayed it
        conversation = first[0]["conversation_id"]

        # Requested, a pause holds from the next record the standby would replay: "paused"
        # is only said once there was one.
        standby.sql("SELECT pg_wal_replay_pause()")
        state = standby.sql("SELECT pg_get_wal_replay_pause_state()").strip()
        assert state in ("pause requested", "paused"), state
        chat(gw, member, "second words about egrets")
        until(lambda: stored_on_primary() == 2)

        # Every read API answers from the replica, which has not replayed the second record.
        assert [c["id"] for c in listed()] == [first[0]["id"]]
        assert len(admin.get(f"/users/{member.user_id}/conversations").json()["data"]) == 1
        assert admin.get("/search", params={"q": "egrets"}).json()["data"] == []
        herons = admin.get("/search", params={"q": "herons"}).json()["data"]
        assert {hit["conversation_id"] for hit in herons} == {conversation}  # asked, answered
        assert sum(row["requests"] for row in admin.get("/stats").json()["data"]) == 1
        assert len(admin.get("/export").text.splitlines()) == 1
        assert len(plain.get("/v1/chat/completions", headers=own).json()["data"]) == 1
        assert len(plain.get("/me/completions", headers=own).json()["data"]) == 1

        # Writes go to the primary: the replica, read-only and paused, could take none.
        renamed = admin.patch(f"/conversations/{conversation}", json={"title": "Herons"})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["title"] == "Herons"
        titled = f"SELECT title FROM conversations WHERE id = '{conversation}'"
        assert primary.sql(titled, database=name).strip() == "Herons"

        ready = plain.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["databases"] == {"main": "ok", "history_replica": "ok"}

        standby.sql("SELECT pg_wal_replay_resume()")
        until(lambda: len(listed()) == 2)  # replayed in order: the rename next
        until(lambda: admin.get(f"/conversations/{conversation}").json()["title"] == "Herons")


def test_a_replica_down_fails_reads_not_requests_or_capture(
    upstream: Any, replicated: tuple[DatabaseServer, DatabaseServer], tmp_path: Path
) -> None:
    """The read APIs need the replica; the proxy and its capture do not, so a replica that
    cannot be reached is reported by ``/readyz`` without taking the gateway out of
    rotation."""
    primary, _ = replicated
    name = primary.new_database_name("mes_replica_down")
    nowhere = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/{name}"  # no one there
    env = {"MES_SQL_READ_DSN": nowhere, "DB_CONNECT_TIMEOUT": "2"}
    with (
        managed_gateway(upstream, primary.url(name), tmp_path, **env) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as plain,
    ):
        member = new_member(gw, "writer")
        chat(gw, member, "stored all the same")
        until(lambda: primary.sql("SELECT count(*) FROM completions", database=name).strip() == "1")
        ready = plain.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["databases"]["main"] == "ok"
        assert ready.json()["databases"]["history_replica"].startswith("unreachable")
        own = {"Authorization": f"Bearer {member.key}"}
        for path, headers in (
            ("/admin/completions", ADMIN),
            ("/me/completions", own),
            ("/v1/chat/completions", own),
        ):
            failed = plain.get(path, headers=headers)
            assert failed.status_code == 503, (path, failed.text)
            assert failed.json()["error"]["code"] == "history_unavailable"
