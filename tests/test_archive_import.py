"""History exported, wiped and imported back answers every read API as before, on every
backend: completions, conversations (titles, tags), messages, search, statistics, the
user's stored completions through the OpenAI SDK. Importing twice stores once; a line
that is no record is reported with its line number and skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
from sqlalchemy import delete

from storage.database import create_engine
from storage.dsn import parse_dsn
from storage.restore import Importer
from storage.schema import (
    completions,
    conversations,
    latency_daily,
    messages,
    request_logs,
    usage_daily,
)
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


async def read_back(running: Gateway, user: tuple[str, str]) -> dict[str, Any]:
    """What the read APIs answer about everything stored."""
    admin = running.client
    seen: dict[str, Any] = {}
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
        return await Importer(engine).load(list(paths))
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
        before = await read_back(running, user)
        assert len(before["completions"]) == 9
        assert len(before["threads"]) >= 5 and before["sdk messages"]
        export = tmp_path / "history.jsonl"
        exported = await admin.get("/admin/export", headers=ADMIN)
        export.write_bytes(exported.content)

        await wipe(history_dsn)
        assert await listed(admin, "/admin/completions") == []
        first = await imported(history_dsn, export)
        assert (first.stored, first.present, first.skipped) == (9, 0, 0), first.problems
        assert await read_back(running, user) == before

        again = await imported(history_dsn, export)
        assert (again.stored, again.present) == (0, 9)
        assert await read_back(running, user) == before


async def test_a_json_array_export_and_bad_lines(tmp_path: Path) -> None:
    async with gateway(tmp_path) as running:
        user = await capture_variety(running)
        before = await read_back(running, user)
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
        assert await read_back(running, user) == before
        await wipe(dsn)
        tally = await imported(dsn, tmp_path / "array.json")
        assert (tally.stored, tally.skipped) == (9, 0)
        assert await read_back(running, user) == before
        assert orjson.loads(array)[0]["conversation"]["created_at"]
