"""OpenAI's stored-completions API through the real SDK, on every backend: each caller pages,
retrieves, updates and deletes its own completions, and every response is in OpenAI's shape."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion

from tests.history_db import HistoryDB
from tests.managed import managed_gateway, new_member
from tests.openai_schema import validate, validate_stored_messages

MANY = 250
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


async def make_completions(
    client: AsyncOpenAI, prefix: str, count: int
) -> dict[str, tuple[list[Any], ChatCompletion | str]]:
    """``count`` completions, streamed and not, some with tool calls; what was sent and got."""
    made: dict[str, tuple[list[Any], ChatCompletion | str]] = {}
    gate = asyncio.Semaphore(16)

    async def one(index: int) -> None:
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"{prefix} question {index}"},
        ]
        extra: dict[str, Any] = {"tools": TOOLS} if index % 5 == 0 else {}
        async with gate:
            if index % 2:
                reply = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=messages, metadata={"n": str(index)}, **extra
                )
                made[reply.id] = (messages, reply)
            else:
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=messages, stream=True, **extra
                )
                chunks = [chunk async for chunk in stream]
                made[chunks[0].id] = (
                    messages,
                    "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                )

    await asyncio.gather(*(one(i) for i in range(count)))
    return made


async def wait_for_records(history_dsn: str, count: int) -> None:
    db = HistoryDB(history_dsn)
    try:
        assert await db.wait_for("completions", count) == count
    finally:
        await db.close()


async def test_the_sdk_pages_retrieves_updates_and_deletes_its_own_completions(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        alice, bob = new_member(gateway, "alice"), new_member(gateway, "bob")
        async with (
            AsyncOpenAI(base_url=gateway.base_url, api_key=alice.key) as a,
            AsyncOpenAI(base_url=gateway.base_url, api_key=bob.key) as b,
        ):
            mine = await make_completions(a, "alice", MANY)
            theirs = await make_completions(b, "bob", 10)
            await wait_for_records(history_dsn, MANY + 10)

            # Auto-pagination: every one of alice's, once, none of bob's.
            listed = [c async for c in a.chat.completions.list(limit=20)]
            assert len(listed) == MANY
            assert {c.id for c in listed} == set(mine)
            newest_first = [c.id async for c in a.chat.completions.list(limit=33, order="desc")]
            assert newest_first == [c.id for c in reversed(listed)]
            assert {c.id async for c in b.chat.completions.list()} == set(theirs)

            for completion in listed:
                sent, got = mine[completion.id]
                assert isinstance(completion, ChatCompletion)
                content = got if isinstance(got, str) else got.choices[0].message.content
                assert (completion.choices[0].message.content or "") == (content or "")
                assert completion.usage is not None and completion.usage.total_tokens > 0
                if isinstance(got, ChatCompletion):
                    assert completion.usage == got.usage
                    assert completion.choices[0].finish_reason == got.choices[0].finish_reason
                    assert completion.choices[0].message.tool_calls == (
                        got.choices[0].message.tool_calls
                    )
                    assert completion.metadata == {"n": sent[1]["content"].split()[-1]}

            some_id = next(i for i, (_, got) in mine.items() if isinstance(got, ChatCompletion))
            retrieved = await a.chat.completions.retrieve(some_id)
            assert retrieved.id == some_id
            assert retrieved.choices[0].message == mine[some_id][1].choices[0].message  # type: ignore[union-attr]

            stored = [m async for m in a.chat.completions.messages.list(some_id)]
            assert [(m.id, m.role, m.content) for m in stored] == [
                (f"{some_id}-{i}", m["role"], m["content"]) for i, m in enumerate(mine[some_id][0])
            ]

            updated = await a.chat.completions.update(some_id, metadata={"reviewed": "yes"})
            assert updated.metadata == {"reviewed": "yes"}
            found = [c.id async for c in a.chat.completions.list(metadata={"reviewed": "yes"})]
            assert found == [some_id]

            deleted = await a.chat.completions.delete(some_id)
            assert deleted.deleted and deleted.id == some_id
            with pytest.raises(openai.NotFoundError):
                await a.chat.completions.retrieve(some_id)
            assert len([c async for c in a.chat.completions.list(limit=100)]) == MANY - 1

            # Bob's ids are not alice's to read, change or delete.
            bobs = next(iter(theirs))
            for call in (
                a.chat.completions.retrieve(bobs),
                a.chat.completions.update(bobs, metadata={"x": "y"}),
                a.chat.completions.delete(bobs),
            ):
                with pytest.raises(openai.NotFoundError):
                    await call
            assert (await b.chat.completions.retrieve(bobs)).id == bobs


def test_every_stored_completions_response_validates_against_openais_schema(
    upstream: Any, tmp_path: Path
) -> None:
    history_dsn = str(tmp_path / "h.db")
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        member = new_member(gateway, "carol")
        client = OpenAI(base_url=gateway.base_url, api_key=member.key)
        parts = [
            {"type": "text", "text": "Describe"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]
        first = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": parts},
            ],
            tools=TOOLS,
        )
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        http = httpx.Client(
            base_url=gateway.base_url, headers={"Authorization": f"Bearer {member.key}"}
        )
        asyncio.run(wait_for_records(history_dsn, 2))
        listed = http.get("/chat/completions", params={"limit": 1})
        validate(listed.json(), "ChatCompletionList")
        assert listed.json()["has_more"] is True
        validate(http.get("/chat/completions").json(), "ChatCompletionList")
        retrieved = http.get(f"/chat/completions/{first.id}").json()
        validate(retrieved, "CreateChatCompletionResponse")
        messages = http.get(f"/chat/completions/{first.id}/messages").json()
        validate_stored_messages(messages)
        assert messages["data"][1]["content_parts"] == parts
        updated = http.post(f"/chat/completions/{first.id}", json={"metadata": {"a": "b"}})
        validate(updated.json(), "CreateChatCompletionResponse")
        deleted = http.delete(f"/chat/completions/{first.id}")
        validate(deleted.json(), "ChatCompletionDeleted")
        missing = http.get(f"/chat/completions/{first.id}")
        assert missing.status_code == 404
        validate(missing.json(), "ErrorResponse")
        assert http.get("/chat/completions", params={"limit": 0}).status_code == 400
        no_key = httpx.get(gateway.base_url + "/chat/completions")
        assert no_key.status_code == 401
        validate(no_key.json(), "ErrorResponse")
