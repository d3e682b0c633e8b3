"""The Responses API, embeddings and legacy completions through a gateway process, with the
real ``openai`` SDK, on every backend: what each client got is what was recorded, a
function-calling loop chained by ``previous_response_id`` (as Codex and agents run it) is
one conversation whose every item is stored once, and every read API says which API each
record called."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from sqlalchemy import func, select

from storage.schema import completions, conversations, messages, request_logs
from tests.history_db import HistoryDB
from tests.managed import ADMIN, managed_gateway, new_member

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "run_shell",
        "description": "Run a command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    }
]
TURNS = 8


def _dumped(items: list[Any]) -> list[Any]:
    return [
        item.model_dump(exclude_none=True) if hasattr(item, "model_dump") else item
        for item in items
    ]


async def _codex_loop(client: AsyncOpenAI, sync: OpenAI) -> tuple[list[Any], list[Any]]:
    """A loop as Codex runs it: a question, the model calls a tool, the tool's output goes
    back with ``previous_response_id``, the model answers, the next question follows up.
    Turns alternate between ``create``, ``create(stream=True)``, ``responses.stream`` and
    the sync client. Returns each turn's input items and output items."""
    sent: list[Any] = []
    got: list[Any] = []
    previous: str | None = None
    pending: list[Any] = [{"role": "user", "content": "list the files"}]
    for turn in range(TURNS):
        args: dict[str, Any] = {
            "model": "gpt-5-codex",
            "input": pending,
            "tools": TOOLS,
            "reasoning": {"effort": "low", "summary": "auto"},
            "instructions": "You are a coding agent.",
        }
        if previous:
            args["previous_response_id"] = previous
        if turn % 4 == 0:
            response = await client.responses.create(**args)
        elif turn % 4 == 1:
            stream = await client.responses.create(**args, stream=True)
            events = [event async for event in stream]
            assert [e.sequence_number for e in events] == list(range(len(events)))
            response = events[-1].response  # type: ignore[union-attr]
        elif turn % 4 == 2:
            async with client.responses.stream(**args) as stream:
                response = await stream.get_final_response()
        else:
            response = await asyncio.to_thread(sync.responses.create, **args)
        assert response.status == "completed"
        sent.append(pending)
        got.append(_dumped(response.output))
        previous = response.id
        calls = [item for item in response.output if item.type == "function_call"]
        if calls:
            pending = [
                {
                    "type": "function_call_output",
                    "call_id": call.call_id,
                    "output": f"a.txt b.txt {turn}",
                }
                for call in calls
            ]
        else:
            pending = [{"role": "user", "content": f"now step {turn + 1}"}]
    return sent, got


async def test_a_codex_loop_chained_by_previous_response_id_is_one_conversation_stored_once(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        member = new_member(gateway, "coder")
        async with AsyncOpenAI(base_url=gateway.base_url, api_key=member.key) as client:
            with OpenAI(base_url=gateway.base_url, api_key=member.key) as sync:
                sent, got = await _codex_loop(client, sync)
        db = HistoryDB(history_dsn)
        try:
            assert await db.wait_for("completions", TURNS) == TURNS
            rows = await db.rows(select(completions).order_by(completions.c.started_at))
            assert {row["call_type"] for row in rows} == {"responses"}
            assert len({row["conversation_id"] for row in rows}) == 1
            # Every item once: what each turn sent and got, and nothing more.
            items = sum(len(s) + len(g) for s, g in zip(sent, got, strict=True))
            stored = await db.rows(select(func.count().label("n")).select_from(messages))
            assert stored[0]["n"] == items
            assert {row["finish_reason"] for row in rows} == {"stop"}
            assert all(row["prompt_tokens"] and row["reasoning_tokens"] for row in rows)
            assert all(row["ttft_ms"] is not None for row in rows if row["stream"])
        finally:
            await db.close()
        with httpx.Client(base_url=gateway.url, headers=ADMIN) as admin:
            listed = admin.get(
                f"/admin/users/{member.user_id}/completions", params={"order": "asc"}
            )
            records = listed.json()["data"]
            assert [r["call_type"] for r in records] == ["responses"] * TURNS
            for record, items, output in zip(records, sent, got, strict=True):
                detail = admin.get(f"/admin/completions/{record['response_id']}").json()
                assert detail["request"] == items
                assert detail["answer"] == output
                assert detail["params"]["instructions"] == "You are a coding agent."
            thread = admin.get(f"/admin/conversations/{records[0]['conversation_id']}").json()
            assert thread["call_type"] == "responses"
            assert thread["thread"] == [x for s, g in zip(sent, got, strict=True) for x in s + g]
            by_kind = admin.get("/admin/stats", params={"by": "call_type"}).json()["data"]
            assert [(row["key"], row["requests"]) for row in by_kind] == [("responses", TURNS)]
            tuned = admin.get("/admin/export", params={"format": "fine-tuning"}).text.splitlines()
            assert len(tuned) == TURNS  # every turn maps onto chat messages
            # A follow-up's example holds the whole loop before it, calls before their outputs.
            example = json.loads(tuned[-1])["messages"]
            assert example[:2] == [
                {"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "list the files"},
            ]
            called = set()
            for message in example:
                called.update(c["id"] for c in message.get("tool_calls", ()))
                assert message["role"] != "tool" or message["tool_call_id"] in called


async def test_a_stateless_loop_that_resends_its_items_stores_each_once(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        member = new_member(gateway, "stateless")
        items: list[Any] = [{"role": "user", "content": "fix the bug"}]
        async with AsyncOpenAI(base_url=gateway.base_url, api_key=member.key) as client:
            for turn in range(6):
                response = await client.responses.create(
                    model="gpt-5", input=items, tools=TOOLS, store=False
                )
                items += _dumped(response.output)
                calls = [item for item in response.output if item.type == "function_call"]
                items += [
                    {"type": "function_call_output", "call_id": c.call_id, "output": f"ok {turn}"}
                    for c in calls
                ] or [{"role": "user", "content": f"and then {turn}?"}]
        db = HistoryDB(history_dsn)
        try:
            assert await db.wait_for("completions", 6) == 6
            ids = await db.rows(select(completions.c.conversation_id).distinct())
            assert len(ids) == 1
            stored = (await db.rows(select(func.count().label("n")).select_from(messages)))[0]["n"]
            assert stored == len(items) - 1  # all but the last, which no request sent
        finally:
            await db.close()


async def test_incomplete_failed_and_broken_streams_are_recorded_as_such(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        member = new_member(gateway, "edge")
        async with AsyncOpenAI(
            base_url=gateway.base_url, api_key=member.key, max_retries=0
        ) as client:
            for status in ("incomplete", "failed"):
                for stream in (False, True):
                    headers = {"X-Fake-Response-Status": status}
                    if stream:
                        events = [
                            e
                            async for e in await client.responses.create(
                                model="m",
                                input=f"{status} streamed",
                                stream=True,
                                extra_headers=headers,
                            )
                        ]
                        assert events[-1].type == f"response.{status}"
                    else:
                        answer = await client.responses.create(
                            model="m", input=f"{status} whole", extra_headers=headers
                        )
                        assert answer.status == status
            errored = await client.responses.create(
                model="m",
                input="error event",
                stream=True,
                extra_headers={"X-Fake-Stream-Error": "1"},
            )
            assert [e async for e in errored][-1].type == "error"
            with pytest.raises(openai.APIError):
                cut = await client.responses.create(
                    model="m", input="cut", stream=True, extra_headers={"X-Fake-Reset-After": "6"}
                )
                async for _ in cut:
                    pass
        db = HistoryDB(history_dsn)
        try:
            assert await db.wait_for("completions", 6) == 6
            rows = await db.rows(select(completions))
            by_prompt = {}
            for row in rows:
                detail = await db.rows(
                    select(messages.c.content_text).where(
                        messages.c.conversation_id == row["conversation_id"],
                        messages.c.hash == row["request_hash"],
                    )
                )
                by_prompt[detail[0]["content_text"]] = row
            assert by_prompt["incomplete whole"]["finish_reason"] == "max_output_tokens"
            assert by_prompt["incomplete streamed"]["finish_reason"] == "max_output_tokens"
            assert by_prompt["failed whole"]["finish_reason"] == "failed"
            assert by_prompt["failed streamed"]["error_type"]
            assert by_prompt["error event"]["finish_reason"] == "failed"
            assert by_prompt["error event"]["error_message"]
            assert by_prompt["cut"]["finish_reason"] == "upstream_disconnected"
            assert by_prompt["cut"]["response_id"]  # from response.created, before the cut
        finally:
            await db.close()


async def test_embeddings_and_legacy_completions_are_captured_and_read_by_call_type(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        member = new_member(gateway, "mixed")
        async with AsyncOpenAI(base_url=gateway.base_url, api_key=member.key) as client:
            vectors = await client.embeddings.create(
                model="text-embedding-3-small", input=["the quick fox", "日本語の文"], dimensions=8
            )
            assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8
            encoded = await client.embeddings.create(
                model="text-embedding-3-small", input="base64 please", encoding_format="base64"
            )
            assert len(encoded.data[0].embedding) > 0
            whole = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once")
            streamed = [
                chunk
                async for chunk in await client.completions.create(
                    model="gpt-3.5-turbo-instruct", prompt="Twice", stream=True
                )
            ]
            assert all(chunk.usage is None for chunk in streamed)  # asked for, taken out
            chat = await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
        db = HistoryDB(history_dsn)
        try:
            assert await db.wait_for("completions", 5) == 5
            rows = {row["call_type"]: row for row in await db.rows(select(completions))}
            assert rows["embeddings"]["prompt_tokens"] and rows["embeddings"]["stream"] is False
            text = "".join(c.choices[0].text for c in streamed if c.choices)
            logs = await db.rows(select(request_logs))
            assert logs == []  # every one of them was captured, none only logged
        finally:
            await db.close()
        with httpx.Client(base_url=gateway.url, headers=ADMIN) as admin:
            user = f"/admin/users/{member.user_id}"
            kinds = [r["call_type"] for r in admin.get(f"{user}/completions").json()["data"]]
            assert sorted(kinds) == [
                "chat",
                "completions",
                "completions",
                "embeddings",
                "embeddings",
            ]
            only = admin.get(f"{user}/completions", params={"call_type": "completions"}).json()
            answers = [
                admin.get(f"/admin/completions/{r['id']}").json()["answer"]["content"]
                for r in only["data"]
            ]
            assert sorted(answers) == sorted([whole.choices[0].text, text])
            listed = admin.get(f"{user}/conversations").json()["data"]
            assert "embeddings" not in {c["call_type"] for c in listed}
            asked = admin.get(f"{user}/conversations", params={"call_type": "embeddings"}).json()
            assert len(asked["data"]) == 2
            hit = admin.get("/admin/search", params={"q": "日本語"}).json()["data"]
            assert [(h["call_type"], h["role"]) for h in hit] == [("embeddings", "user")]
            embedded = admin.get(f"{user}/completions", params={"call_type": "embeddings"}).json()
            detail = admin.get(f"/admin/completions/{embedded['data'][-1]['id']}").json()
            assert detail["request"] in (
                [
                    {"role": "user", "content": "the quick fox"},
                    {"role": "user", "content": "日本語の文"},
                ],
                [{"role": "user", "content": "base64 please"}],
            )
            assert detail["answer"] is None
            assert repr(vectors.data[0].embedding[0]) not in str(detail)  # never the vectors
            stats = admin.get("/admin/stats", params={"by": "call_type"}).json()["data"]
            assert {row["key"]: row["requests"] for row in stats} == {
                "chat": 1,
                "completions": 2,
                "embeddings": 2,
            }
        async with AsyncOpenAI(base_url=gateway.base_url, api_key=member.key) as client:
            stored = [c async for c in client.chat.completions.list()]
            assert [c.id for c in stored] == [chat.id]  # OpenAI's lists chat completions alone


async def test_stored_responses_routes_are_relayed_and_logged(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        member = new_member(gateway, "keeper")
        with OpenAI(base_url=gateway.base_url, api_key=member.key) as client:
            made = client.responses.create(model="gpt-5", input="remember me")
            assert client.responses.retrieve(made.id).id == made.id
            items = list(client.responses.input_items.list(made.id))
            assert items and items[0].type == "message"
            with pytest.raises(openai.BadRequestError):
                client.responses.cancel(made.id)  # only a background response can be
            client.responses.delete(made.id)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(made.id)
        db = HistoryDB(history_dsn)
        try:
            assert await db.wait_for("request_logs", 5) == 5
            logs = await db.rows(select(request_logs).order_by(request_logs.c.started_at))
            assert [
                (r["method"], r["path"].replace(made.id, "ID"), r["status_code"]) for r in logs
            ] == [
                ("GET", "/v1/responses/ID", 200),
                ("GET", "/v1/responses/ID/input_items", 200),
                ("POST", "/v1/responses/ID/cancel", 400),
                ("DELETE", "/v1/responses/ID", 200),
                ("GET", "/v1/responses/ID", 404),
            ]
            assert await db.wait_for("completions", 1) == 1
            assert (await db.rows(select(conversations.c.call_type)))[0]["call_type"] == "responses"
        finally:
            await db.close()
