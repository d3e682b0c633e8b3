"""The admin API on every backend: users and keys, a user's history, one conversation,
statistics, export, deletion that keeps shared messages, pruning, and the audit log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import OpenAI
from sqlalchemy import text, update

from storage.schema import completions
from storage.stats import percentile
from tests.history_db import HistoryDB
from tests.managed import ADMIN, managed_gateway, new_member


async def recorded(history_dsn: str, count: int) -> None:
    db = HistoryDB(history_dsn)
    try:
        assert await db.wait_for("completions", count) == count
    finally:
        await db.close()


async def set_latencies_and_age(history_dsn: str, latencies: list[float], old: int) -> None:
    """Known latencies, in order of start, and the first ``old`` completions 40 days old."""
    db = HistoryDB(history_dsn)
    try:
        rows = sorted(await db.completions(), key=lambda r: (r["started_at"], r["id"]))
        async with db.engine.begin() as connection:
            for row, latency in zip(rows, latencies, strict=True):
                await connection.execute(
                    update(completions)
                    .where(completions.c.id == row["id"])
                    .values(latency_ms=latency)
                )
            for row in rows[:old]:
                await connection.execute(
                    update(completions)
                    .where(completions.c.id == row["id"])
                    .values(started_at=row["started_at"] - timedelta(days=40))
                )
    finally:
        await db.close()


def test_keys_are_shown_once_and_stop_working_when_revoked_or_the_user_is_disabled(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        admin = httpx.Client(base_url=gateway.url + "/admin", headers=ADMIN)
        assert httpx.get(gateway.url + "/admin/users").status_code == 401
        member = new_member(gateway, "dora")
        keys = admin.get(f"/users/{member.user_id}/keys").json()["data"]
        assert [k["id"] for k in keys] == [member.key_id]
        assert "key" not in keys[0] and member.key not in admin.get("/audit").text
        client = OpenAI(base_url=gateway.base_url, api_key=member.key, max_retries=0)
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert client.chat.completions.create(**chat).choices
        with pytest.raises(openai.AuthenticationError):
            OpenAI(
                base_url=gateway.base_url, api_key="mes-made-up", max_retries=0
            ).chat.completions.create(**chat)

        assert admin.post(f"/users/{member.user_id}/disable").json()["disabled_at"]
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(**chat)
        admin.post(f"/users/{member.user_id}/enable")
        assert client.chat.completions.create(**chat).choices

        revoked = admin.post(f"/keys/{member.key_id}/revoke").json()
        assert revoked["revoked_at"] is not None
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(**chat)
        assert refused.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        actions = [entry["action"] for entry in admin.get("/audit").json()["data"]]
        assert actions[:5] == [
            "key.revoked",
            "user.enabled",
            "user.disabled",
            "key.issued",
            "user.created",
        ]


def test_a_users_history_conversation_stats_export_and_deletion(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        admin = httpx.Client(base_url=gateway.url + "/admin", headers=ADMIN, timeout=60)
        erin = new_member(gateway, "erin")
        client = OpenAI(base_url=gateway.base_url, api_key=erin.key, max_retries=0)
        history: list[Any] = [{"role": "user", "content": "plan a trip to 北京"}]
        for turn in range(4):
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=history)
            history += [
                {"role": "assistant", "content": reply.choices[0].message.content},
                {"role": "user", "content": f"and day {turn + 2}?"},
            ]
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
        )
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "fail"}],
                extra_headers={"X-Fake-Status": "429"},
            )
        asyncio.run(recorded(history_dsn, 6))
        latencies = [10.0, 20.0, 30.0, 40.0, 50.0, 1000.0]
        asyncio.run(set_latencies_and_age(history_dsn, latencies, old=1))

        conversations = admin.get(f"/users/{erin.user_id}/conversations").json()["data"]
        assert len(conversations) == 3
        trip = next(c for c in conversations if c["completion_count"] == 4)
        # 4 questions, 4 answers as returned, and 3 of them as the client sent them back
        # (without the "refusal": null and "annotations": [] the upstream returned).
        assert trip["title"] == "plan a trip to 北京" and trip["message_count"] == 11
        detail = admin.get(f"/conversations/{trip['id']}").json()
        last_request = history[:-2]
        assert detail["thread"][:-1] == last_request
        assert detail["thread"][-1]["content"] == history[-2]["content"]
        assert len(detail["completions"]) == 4 and len(detail["messages"]) == 11

        listed = admin.get(f"/users/{erin.user_id}/completions", params={"limit": 2}).json()
        assert len(listed["data"]) == 2 and listed["has_more"] is True
        rest = admin.get(
            f"/users/{erin.user_id}/completions", params={"after": listed["last_id"]}
        ).json()
        assert len(rest["data"]) == 4 and rest["has_more"] is False
        errors = admin.get(f"/users/{erin.user_id}/completions", params={"errors_only": True})
        assert [c["status_code"] for c in errors.json()["data"]] == [429]
        tools = admin.get(f"/users/{erin.user_id}/completions", params={"tool": "get_weather"})
        assert [c["requested_model"] for c in tools.json()["data"]] == ["gpt-4o"]
        gpt4o = admin.get(f"/users/{erin.user_id}/conversations", params={"model": "gpt-4o"})
        assert len(gpt4o.json()["data"]) == 1

        by_user = admin.get("/stats", params={"by": "user", "user_id": erin.user_id}).json()
        (row,) = by_user["data"]
        assert (row["requests"], row["errors"]) == (6, 1)
        for p, name in (
            (0.5, "latency_p50_ms"),
            (0.95, "latency_p95_ms"),
            (0.99, "latency_p99_ms"),
        ):
            assert row[name] == pytest.approx(percentile(sorted(latencies), p))
        by_model = {
            r["key"]: r["requests"]
            for r in admin.get("/stats", params={"by": "model"}).json()["data"]
        }
        assert by_model["gpt-4o-2024-08-06"] == 1
        assert sum(r["requests"] for r in admin.get("/stats").json()["data"]) == 6

        exported = admin.get("/export", params={"format": "json", "user_id": erin.user_id})
        records = orjson.loads(exported.content)
        assert len(records) == 6
        assert [r["request"] for r in records if r["request_message_count"] == 7] == [last_request]
        tuning = admin.get("/export", params={"format": "fine-tuning"}).text.splitlines()
        assert len(tuning) == 5  # the 429 has no answer

        # Deleting the first turn keeps every message the later turns resend.
        first = sorted(detail["completions"], key=lambda c: c["started_at"])[0]
        sdk_id = first["response_id"]
        client.chat.completions.delete(sdk_id)
        after = admin.get(f"/conversations/{trip['id']}").json()
        # Only the first answer as returned goes: every other message is still resent.
        assert after["completion_count"] == 3 and after["message_count"] == 10
        assert after["thread"] == detail["thread"]
        latest = sorted(after["completions"], key=lambda c: c["started_at"])[-1]
        assert admin.get(f"/completions/{latest['id']}").json()["request"] == last_request

        pruned = admin.post("/prune", json={"older_than_days": 30}).json()
        assert pruned["completions"] == 0  # the one 40 days old was the deleted first turn
        assert admin.delete(f"/conversations/{trip['id']}").json()["completions"] == 3
        assert admin.get(f"/conversations/{trip['id']}").status_code == 404
        wiped = admin.delete(f"/users/{erin.user_id}/history").json()
        assert wiped["completions"] == 2 and wiped["conversations"] == 2
        assert admin.get(f"/users/{erin.user_id}/completions").json()["data"] == []
        actions = {entry["action"] for entry in admin.get("/audit").json()["data"]}
        assert {
            "completion.deleted",
            "history.pruned",
            "conversation.deleted",
            "history.user_deleted",
            "history.exported",
        } <= actions


def test_prune_removes_what_is_older_and_only_that(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        admin = httpx.Client(base_url=gateway.url + "/admin", headers=ADMIN)
        fay = new_member(gateway, "fay")
        client = OpenAI(base_url=gateway.base_url, api_key=fay.key, max_retries=0)
        for n in range(4):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{n}"}]
            )
        asyncio.run(recorded(history_dsn, 4))
        asyncio.run(set_latencies_and_age(history_dsn, [1.0] * 4, old=3))
        pruned = admin.post("/prune", json={"older_than_days": 30}).json()
        assert (pruned["completions"], pruned["conversations"], pruned["messages"]) == (3, 3, 6)
        left = client.chat.completions.list().data
        assert [c.choices[0].message.content for c in left] == [
            c.choices[0].message.content for c in left
        ] and len(left) == 1
        since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        assert (
            len(
                admin.get(f"/users/{fay.user_id}/completions", params={"since": since}).json()[
                    "data"
                ]
            )
            == 1
        )


def test_a_gateway_loads_the_admin_api_and_the_viewer_on_their_first_request_only(
    tmp_path: Path,
) -> None:
    """FastAPI, pydantic and Jinja2 (~18 MiB) stay out of a gateway nobody administers."""
    heavy = ("fastapi", "pydantic", "jinja2")
    check = (
        "import sys; from gateway.app import create_app; create_app(); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    env = {"PATH": os.environ.get("PATH", ""), "MES_SQLITE_PATH": str(tmp_path / "x.db")}
    loaded = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


async def _dump(dsn: str) -> str:
    """Every row of every table of the (one) database, as text."""
    db = HistoryDB(dsn)
    try:
        parts = [await db.all_text()]
        for table in ("users", "audit_log", "usage_daily", "latency_daily"):
            parts.extend(repr(tuple(row)) for row in await db.rows(text(f"SELECT * FROM {table}")))
        return "\n".join(parts)
    finally:
        await db.close()


def test_a_user_updated_then_erased_leaves_nothing_of_theirs_and_the_others_as_they_were(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        admin = httpx.Client(base_url=gateway.url + "/admin", headers=ADMIN, timeout=60)
        erin, frank = new_member(gateway, "erin"), new_member(gateway, "frank")
        changed = admin.patch(
            f"/users/{erin.user_id}",
            json={"name": "Erin Quist", "email": "erin.quist@example.com", "metadata": {"t": "a"}},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["name"] == "Erin Quist"
        assert changed.json()["email"] == "erin.quist@example.com"
        assert admin.patch(f"/users/{erin.user_id}", json={"email": None}).json() == {
            **changed.json(),
            "email": None,
        }
        assert admin.patch(f"/users/{erin.user_id}", json={"name": None}).status_code == 422
        assert admin.patch(f"/users/{erin.user_id}", json={"role": "x"}).status_code == 422
        assert admin.patch("/users/user_nobody", json={"name": "x"}).status_code == 404
        admin.patch(f"/users/{erin.user_id}", json={"email": "erin.quist@example.com"})
        for member, said in ((erin, "Erin's plans for Lisbon"), (frank, "Frank's question")):
            client = OpenAI(base_url=gateway.base_url, api_key=member.key, max_retries=0)
            for turn in range(2):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"{said} {turn}"}]
                )
            client.models.list()
        asyncio.run(recorded(history_dsn, 4))
        before = admin.get("/stats", params={"by": "user"}).json()["data"]

        erased = admin.delete(f"/users/{erin.user_id}")
        assert erased.status_code == 200, erased.text
        assert erased.json() == {
            "id": erin.user_id,
            "erased": True,
            "history": {"completions": 2, "conversations": 2, "messages": 4, "request_logs": 1},
        }
        assert admin.delete(f"/users/{erin.user_id}").status_code == 404
        assert admin.get(f"/users/{erin.user_id}").status_code == 404
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=gateway.base_url, api_key=erin.key, max_retries=0).models.list()
        after = admin.get("/stats", params={"by": "user"}).json()["data"]
        audit = admin.get("/audit", params={"limit": 100}).json()["data"]
        dump = asyncio.run(_dump(history_dsn))
    for trace in (erin.user_id, erin.key_id, "Erin", "erin.quist", "Lisbon"):
        assert trace not in dump
    assert "Frank's question 1" in dump
    assert after == [row for row in before if row["key"] == frank.user_id] and len(before) == 2
    actions = [entry["action"] for entry in audit]
    assert actions.count("user.updated") == 3 and actions[0] == "user.erased"
    erased_targets = [e["action"] for e in audit if e["target"] == "erased"]
    assert sorted(erased_targets) == sorted(
        ["user.erased", "user.created", "key.issued", *["user.updated"] * 3]
    )
    assert audit[0]["target"] == "erased" and audit[0]["details"]["completions"] == 2
