"""History exported (or archived as retention removes it), wiped and imported back answers
every read API as before, on every backend and layout: completions, conversations (titles,
tags), messages, search, statistics, request logs, the user's stored completions through
the OpenAI SDK. Importing twice stores once; a line that is no record is reported with its
line number and skipped; a removal whose archive cannot be written does not happen."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import delete

from storage import archive as archive_module
from storage import retention
from storage.archive import Archive, ArchiveFailed
from storage.database import create_engine
from storage.dsn import parse_dsn
from storage.partitions import partitions_in_use
from storage.restore import Importer
from storage.schema import (
    completions,
    conversations,
    latency_daily,
    messages,
    request_logs,
    usage_daily,
)
from tests.conftest import database_dsn
from tests.in_process import ADMIN_KEY, Gateway, gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
HISTORY_TABLES = (completions, messages, conversations, request_logs, usage_daily, latency_daily)
EPHEMERAL = {"type": "ephemeral"}
TOOLS: list[Any] = [{"type": "function", "name": "lookup_order", "parameters": {"type": "object"}}]


def sdk(running: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://gateway.test/v1",
        api_key=key,
        http_client=running.as_user(key),
        max_retries=0,
    )


async def capture_variety(running: Gateway) -> tuple[str, str]:
    """Every kind of call, by two users: a chat conversation of three turns (one streamed,
    one calling a tool), a Responses follow-up, Anthropic messages with a cache marker,
    embeddings, a legacy completion, an upstream error, and calls only logged. Returns
    the users' (id, key) of the first user."""
    ann, bob = await running.new_user("ann"), await running.new_user("bob")
    client = sdk(running, ann[1])
    history: list[Any] = [{"role": "user", "content": "plan a trip to 北京, 秘密 budget"}]
    for turn in range(3):
        if turn == 1:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=history, stream=True, metadata={"turn": "two"}
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            history += [{"role": "assistant", "content": text}]
        else:
            answer = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=history,
                tools=[{"type": "function", "function": {"name": "weather"}}] if turn else None,
                store=True,
            )
            history += [answer.choices[0].message.model_dump(exclude_none=True)]
        history += [{"role": "user", "content": f"and day {turn + 2}?"}]
    first = await client.responses.create(model="gpt-5", input="where is order 77?", tools=TOOLS)
    await client.responses.create(
        model="gpt-5", previous_response_id=first.id, input="and order 78?", tools=TOOLS
    )
    await client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")
    async with running.as_user(bob[1]) as raw:
        said = await raw.post(
            "/v1/messages",
            json={
                "model": "claude-sonnet-4-5",
                "max_tokens": 64,
                "system": "be brief",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "hello", "cache_control": EPHEMERAL}],
                    }
                ],
            },
            headers={"anthropic-version": "2023-06-01"},
        )
        assert said.status_code == 200, said.text
        refused = await raw.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "fail"}]},
            headers={"X-Fake-Status": "429"},
        )
        assert refused.status_code == 429
        await raw.get("/v1/models")
    await running.settled()
    return ann


async def listed(admin: httpx.AsyncClient, path: str, **params: Any) -> list[Any]:
    found: list[Any] = []
    while True:
        page = (await admin.get(path, params={**params, "limit": 100}, headers=ADMIN)).json()
        found += page["data"]
        if not page["has_more"]:
            return found
        params["after"] = page["last_id"]


async def read_back(running: Gateway, user: tuple[str, str], logs: bool = True) -> dict[str, Any]:
    """What the read APIs answer about everything stored (an export has no request logs:
    without ``logs``, they are not read)."""
    admin = running.client
    seen: dict[str, Any] = {}
    if logs:
        seen["request logs"] = await listed(admin, "/admin/request-logs")
    seen["completions"] = await listed(admin, "/admin/completions")
    seen["details"] = [
        (await admin.get(f"/admin/completions/{c['id']}", headers=ADMIN)).json()
        for c in seen["completions"]
    ]
    seen["conversations"] = await listed(admin, "/admin/conversations", include_embeddings=True)
    seen["threads"] = [
        (await admin.get(f"/admin/conversations/{c['id']}", headers=ADMIN)).json()
        for c in seen["conversations"]
    ]
    for phrase in ("北京", "hello", "order 78", "be brief"):
        found = await admin.get("/admin/search", params={"q": phrase}, headers=ADMIN)
        seen[f"search {phrase}"] = found.json()
    for by in ("user", "model", "day", "call_type"):
        stats = await admin.get("/admin/stats", params={"by": by}, headers=ADMIN)
        seen[f"stats {by}"] = stats.json()["data"]
    client = sdk(running, user[1])
    stored = [c.model_dump() async for c in client.chat.completions.list()]
    seen["sdk"] = stored
    seen["sdk messages"] = [
        [m.model_dump() async for m in client.chat.completions.messages.list(c["id"])]
        for c in stored
    ]
    return seen


async def wipe(dsn: str) -> None:
    engine = create_engine(parse_dsn(dsn), pool_size=1)
    async with engine.begin() as connection:
        for table in HISTORY_TABLES:
            await connection.execute(delete(table))
    await engine.dispose()


async def imported(dsn: str, *paths: Path) -> Any:
    engine = create_engine(parse_dsn(dsn), pool_size=2)
    try:
        partitions = await partitions_in_use(engine, False, today())  # as the database is
        return await Importer(engine, partitions).load(list(paths))
    finally:
        await engine.dispose()


async def test_an_export_wiped_and_imported_reads_back_the_same(
    tmp_path: Path, history_dsn: str
) -> None:
    async with gateway(tmp_path, mes_sql_dsn=history_dsn) as running:
        user = await capture_variety(running)
        admin = running.client
        (trip,) = [
            c for c in await listed(admin, "/admin/conversations") if "北京" in (c["title"] or "")
        ]
        renamed = await admin.patch(
            f"/admin/conversations/{trip['id']}",
            json={"title": "Beijing", "tags": ["travel"], "metadata": {"team": "a"}},
            headers=ADMIN,
        )
        assert renamed.status_code == 200, renamed.text
        before = await read_back(running, user, logs=False)
        assert len(before["completions"]) == 9
        assert len(before["threads"]) >= 5 and before["sdk messages"]
        export = tmp_path / "history.jsonl"
        exported = await admin.get("/admin/export", headers=ADMIN)
        export.write_bytes(exported.content)

        await wipe(history_dsn)
        assert await listed(admin, "/admin/completions") == []
        first = await imported(history_dsn, export)
        assert (first.stored, first.present, first.skipped) == (9, 0, 0), first.problems
        assert await read_back(running, user, logs=False) == before

        again = await imported(history_dsn, export)
        assert (again.stored, again.present) == (0, 9)
        assert await read_back(running, user, logs=False) == before


async def test_a_json_array_export_and_bad_lines(tmp_path: Path) -> None:
    async with gateway(tmp_path) as running:
        user = await capture_variety(running)
        before = await read_back(running, user, logs=False)
        array = (await running.client.get("/admin/export?format=json", headers=ADMIN)).content
        lines = (await running.client.get("/admin/export", headers=ADMIN)).content.splitlines()
        damaged = tmp_path / "damaged.jsonl"
        damaged.write_bytes(
            b"\n".join([lines[0], b"{not json", b'{"id": "x"}', *lines[1:], b"[1, 2]"]) + b"\n"
        )
        (tmp_path / "array.json").write_bytes(array)
        dsn = running.services.settings.history_dsn
        await wipe(dsn)
        tally = await imported(dsn, damaged)
        assert tally.stored == 9 and tally.skipped == 3
        assert [p.split(": ")[0] for p in tally.problems] == [
            f"{damaged}:2",
            f"{damaged}:3",
            f"{damaged}:{len(lines) + 3}",
        ]
        assert await read_back(running, user, logs=False) == before
        await wipe(dsn)
        tally = await imported(dsn, tmp_path / "array.json")
        assert (tally.stored, tally.skipped) == (9, 0)
        assert await read_back(running, user, logs=False) == before
        assert orjson.loads(array)[0]["conversation"]["created_at"]


def today() -> date:
    return datetime.now(UTC).date()


def archive_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jsonl.gz"))


def manifests(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path) as file:
        return [line["manifest"] for line in map(orjson.loads, file) if "manifest" in line]


async def emptied(running: Gateway) -> None:
    admin = running.client
    for path in ("/admin/completions", "/admin/conversations", "/admin/request-logs"):
        assert await listed(admin, path) == [], path


@pytest.mark.parametrize("partitioned", [False, True], ids=["one-table", "by-day"])
async def test_retention_archives_what_it_removes_and_import_restores_it(
    tmp_path: Path, history_dsn: str, partitioned: bool
) -> None:
    archive = tmp_path / "archive"
    async with gateway(
        tmp_path, mes_sql_dsn=history_dsn, archive_dir=str(archive), mes_daily_partition=partitioned
    ) as running:
        user = await capture_variety(running)
        before = await read_back(running, user)
        assert len(before["request logs"]) == 1
        maintenance = running.services.maintenance
        tomorrow = datetime.combine(today() + timedelta(days=1), datetime.min.time())
        run = await maintenance.archived(
            retention.prune(
                maintenance.history,
                tomorrow,
                partitions=maintenance.partitions,
                archive=maintenance.archive,
            )
        )
        assert run.deleted.completions == 9 and run.days_dropped == (1 if partitioned else 0)
        await emptied(running)
        (day_file,) = archive_files(archive)
        assert day_file.name == f"{maintenance.archive.database}-{today().isoformat()}.jsonl.gz"
        written = manifests(day_file)  # a member a step (or, by day, the whole day)
        assert len(written) == 1 or not partitioned
        assert sum(m["completions"] for m in written) == 9
        assert sum(m["request_logs"] for m in written) == 1
        assert running.services.metrics.counters["archive_records"] == 10

        tally = await imported(running.services.settings.history_dsn, day_file)
        assert (tally.stored, tally.skipped, tally.manifests) == (10, 0, len(written))
        assert tally.problems == []
        assert await read_back(running, user) == before


async def test_a_prune_archives_and_content_retention_keeps_what_it_drops(
    tmp_path: Path, history_dsn: str
) -> None:
    archive = tmp_path / "archive"
    async with gateway(tmp_path, mes_sql_dsn=history_dsn, archive_dir=str(archive)) as running:
        user = await capture_variety(running)
        before = await read_back(running, user)
        maintenance = running.services.maintenance
        tomorrow = datetime.combine(today() + timedelta(days=1), datetime.min.time())
        run = await maintenance.archived(
            retention.drop_content(maintenance.history, tomorrow, archive=maintenance.archive)
        )
        assert run.contents_dropped > 0
        dropped = await read_back(running, user)
        assert dropped["search 北京"]["data"] == [] and before["search 北京"]["data"]
        pruned = await running.client.post(
            "/admin/prune", json={"older_than_days": 0}, headers=ADMIN
        )
        assert pruned.status_code == 200 and pruned.json()["completions"] == 9
        await emptied(running)
        (day_file,) = archive_files(archive)
        reasons = [(m["reason"], m["completions"], m["request_logs"]) for m in manifests(day_file)]
        # the content round kept each completion once, whole; the prune all of them, and the
        # request log, without their content: imported in order, the whole ones win
        assert reasons[0] == ("content", 9, 0) or reasons[0][0] == "content"
        assert sum(r[1] for r in reasons if r[0] == "content") == 9
        assert [r for r in reasons if r[0] == "prune"] == [("prune", 9, 0), ("prune", 0, 1)] or (
            sum(r[1] for r in reasons if r[0] == "prune"),
            sum(r[2] for r in reasons if r[0] == "prune"),
        ) == (9, 1)
        tally = await imported(running.services.settings.history_dsn, day_file)
        assert (tally.stored, tally.present, tally.skipped) == (10, 9, 0), tally.problems
        assert await read_back(running, user) == before


async def test_no_removal_without_its_archive(tmp_path: Path) -> None:
    in_the_way = tmp_path / "archive"
    in_the_way.write_text("a file where the archive folder should be")
    async with gateway(tmp_path, archive_dir=str(in_the_way)) as running:
        user = await capture_variety(running)
        before = await read_back(running, user)
        admin = running.client
        refused = await admin.post("/admin/prune", json={"older_than_days": 0}, headers=ADMIN)
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "archive_unwritable"
        assert await read_back(running, user) == before
        ready = (await admin.get("/readyz")).json()
        assert ready["archive"]["status"] == "failing" and ready["status"] == "ready"
        metrics = (await admin.get("/metrics")).text
        assert "mes_archive_failures_total 1" in metrics and "mes_archive_failing 1.0" in metrics

        in_the_way.unlink()
        pruned = await admin.post("/admin/prune", json={"older_than_days": 0}, headers=ADMIN)
        assert pruned.status_code == 200 and pruned.json()["completions"] == 9
        assert (await admin.get("/readyz")).json()["archive"] == "ok"
        assert "mes_archive_failing 0.0" in (await admin.get("/metrics")).text
        tally = await imported(running.services.settings.history_dsn, *archive_files(in_the_way))
        assert tally.stored == 10
        assert await read_back(running, user) == before


def archive_of_one(folder: Path) -> tuple[Archive, date]:
    """An archive in ``folder`` whose day holds one member, of record "a"."""
    kept = Archive(folder, "history")
    day = date(2026, 11, 23)
    first = kept.member(day, "retention")
    first.write([{"id": "a", "started_at": "2026-11-23T10:00:00"}])
    first.commit()
    return kept, day


def test_an_archive_member_that_fails_midway_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept, day = archive_of_one(tmp_path)
    whole = kept.path(day).read_bytes()

    def disk_full(self: Any, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    second = kept.member(day, "retention")
    monkeypatch.setattr(gzip.GzipFile, "write", disk_full)
    with pytest.raises(ArchiveFailed, match="No space left"):
        second.write([{"id": "b", "started_at": "2026-11-23T11:00:00"}])
    monkeypatch.undo()
    assert kept.path(day).read_bytes() == whole

    def no_sync(folder: Path) -> None:
        raise OSError(5, "Input/output error")

    third = kept.member(day, "retention")
    third.write([{"id": "c", "started_at": "2026-11-23T12:00:00"}])
    monkeypatch.setattr(archive_module, "_sync_folder", no_sync)
    with pytest.raises(ArchiveFailed, match="Input/output"):
        third.commit()
    monkeypatch.undo()
    assert kept.path(day).read_bytes() == whole
    assert kept.path(day).name == "history-2026-11-23.jsonl.gz"
    assert [m["last_id"] for m in manifests(kept.path(day))] == ["a"]
    assert kept.records == 1


async def test_a_member_a_process_died_writing_is_cut_off_before_the_next(
    tmp_path: Path,
) -> None:
    kept, day = archive_of_one(tmp_path)
    dying = kept.member(day, "retention")
    dying.write([{"id": f"b{n}", "started_at": "2026-11-23T11:00:00"} for n in range(2000)])
    assert dying._gzip is not None and dying._file is not None
    dying._gzip.flush()
    dying._file.close()  # the process is gone: half a member left, its lock released
    assert kept.path(day).with_name(kept.path(day).name + ".partial").exists()
    last = kept.member(day, "retention")
    last.write([{"id": "c", "started_at": "2026-11-23T12:00:00"}])
    last.commit()
    assert [m["last_id"] for m in manifests(kept.path(day))] == ["a", "c"]
    assert not list(tmp_path.glob("*.partial"))

    cut = tmp_path / "cut.jsonl.gz"  # an archive cut short (copied half-way, say)
    cut.write_bytes(kept.path(day).read_bytes()[:-20])
    tally = await imported(str(tmp_path / "restored.db"), cut)
    assert tally.damaged == 1 and tally.manifests == 1


async def run_import(env: dict[str, str], *paths: Path) -> subprocess.CompletedProcess[str]:
    """``python -m gateway import`` as a person runs it, with ``env`` over this one."""
    command = [sys.executable, "-m", "gateway", "import", *map(str, paths)]
    return await asyncio.to_thread(
        subprocess.run,
        command,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("target", ["postgresql", "mysql"])
async def test_moving_from_sqlite_to_a_server_is_an_export_and_an_import(
    tmp_path: Path, request: pytest.FixtureRequest, target: str
) -> None:
    server = database_dsn(request, target, tmp_path, "moved")
    async with gateway(tmp_path) as running:  # the embedded default
        user = await capture_variety(running)
        before = await read_back(running, user, logs=False)
        export = tmp_path / "history.jsonl"
        export.write_bytes((await running.client.get("/admin/export", headers=ADMIN)).content)
    done = await run_import({"MES_SQL_DSN": server}, export, export)
    assert done.returncode == 0, done.stderr
    assert "9 records stored, 9 already there" in done.stdout, done.stdout
    async with gateway(tmp_path, mes_sql_dsn=server) as moved:  # same users, history moved
        assert await read_back(moved, user, logs=False) == before


async def test_the_import_command_reports_what_it_skipped(tmp_path: Path) -> None:
    async with gateway(tmp_path) as running:
        await capture_variety(running)
        lines = (await running.client.get("/admin/export", headers=ADMIN)).content.splitlines()
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_bytes(b"\n".join([*lines[:2], b'{"request": "no id"}', *lines[2:]]) + b"\n")
    into = {"MES_SQL_DSN": str(tmp_path / "restored.db")}
    done = await run_import(into, damaged)
    assert done.returncode == 1
    assert "9 records stored, 0 already there" in done.stdout
    assert f"{damaged}:3: skipped: 'id' must be a non-empty string" in done.stdout
    missing = await run_import(into, tmp_path / "nowhere.jsonl")
    assert missing.returncode == 2 and "no such file" in missing.stderr
