"""Reading history back, in process (the fast tier): OpenAI's stored-completions API through
the official SDK, the admin API, and the viewer; each user sees their own, the admin
everyone's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import orjson
import pytest
import pytest_asyncio

from tests.in_process import ADMIN_KEY, Gateway, gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Site:
    gateway: Gateway
    ann: tuple[str, str]  # user id, key
    bob: tuple[str, str]
    trip: list[dict[str, Any]]  # ann's conversation as she last sent it

    def sdk(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://gateway.test/v1",
            api_key=key,
            http_client=self.gateway.as_user(key),
            max_retries=0,
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with gateway(tmp_path_factory.mktemp("history")) as running:
        ann, bob = await running.new_user("ann"), await running.new_user("bob")
        client = openai.AsyncOpenAI(
            base_url="http://gateway.test/v1",
            api_key=ann[1],
            http_client=running.as_user(ann[1]),
            max_retries=0,
        )
        trip: list[dict[str, Any]] = [{"role": "user", "content": "plan a trip to 北京"}]
        for turn in range(3):
            reply = await client.chat.completions.create(
                model="gpt-4o-mini", messages=trip, metadata={"turn": str(turn)}, store=True
            )
            trip += [
                {"role": "assistant", "content": reply.choices[0].message.content},
                {"role": "user", "content": f"and day {turn + 2}?"},
            ]
        async with running.as_user(bob[1]) as other:
            answer = await other.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "bob's 秘密"}]},
            )
            assert answer.status_code == 200
        await running.written(4)
        yield Site(running, ann, bob, trip[:-2])


async def test_a_user_lists_reads_updates_and_deletes_their_completions_with_the_sdk(
    site: Site,
) -> None:
    client = site.sdk(site.ann[1])
    listed = [c async for c in client.chat.completions.list(limit=2)]  # pages until has_more ends
    assert len(listed) == 3
    assert [c.metadata for c in listed] == [{"turn": "0"}, {"turn": "1"}, {"turn": "2"}]
    last = await client.chat.completions.retrieve(listed[-1].id)
    assert last.choices[0].message.content
    messages = [m async for m in client.chat.completions.messages.list(last.id)]
    assert [m.content for m in messages] == [m["content"] for m in site.trip]
    assert messages[0].id == f"{last.id}-0"
    updated = await client.chat.completions.update(listed[0].id, metadata={"kept": "yes"})
    assert updated.metadata == {"kept": "yes"}
    filtered = [c async for c in client.chat.completions.list(metadata={"kept": "yes"})]
    assert [c.id for c in filtered] == [listed[0].id]
    deleted = await client.chat.completions.delete(listed[0].id)
    assert deleted.deleted
    assert len([c async for c in client.chat.completions.list()]) == 2


async def test_another_users_completion_does_not_exist_for_them(site: Site) -> None:
    bobs = [c async for c in site.sdk(site.bob[1]).chat.completions.list()]
    assert len(bobs) == 1
    with pytest.raises(openai.NotFoundError):
        await site.sdk(site.ann[1]).chat.completions.retrieve(bobs[0].id)
    async with site.gateway.as_user("sk-nobody") as stranger:
        refused = await stranger.get("/v1/chat/completions")
    assert refused.status_code == 401


async def test_the_admin_reads_conversations_search_stats_and_exports(site: Site) -> None:
    admin = site.gateway.client
    user_id = site.ann[0]
    threads = (await admin.get(f"/admin/users/{user_id}/conversations", headers=ADMIN)).json()
    trip = next(t for t in threads["data"] if t["title"] == "plan a trip to 北京")
    detail = (await admin.get(f"/admin/conversations/{trip['id']}", headers=ADMIN)).json()
    assert detail["thread"][: len(site.trip)] == site.trip
    found = (await admin.get("/admin/search", params={"q": "秘密"}, headers=ADMIN)).json()
    assert found["data"] and {hit["user_id"] for hit in found["data"]} == {site.bob[0]}
    by_user = (await admin.get("/admin/stats", params={"by": "user"}, headers=ADMIN)).json()
    requests = {row["key"]: row["requests"] for row in by_user["data"]}
    assert requests[site.bob[0]] == 1 and requests[user_id] >= 2
    exported = await admin.get(
        "/admin/export", params={"format": "jsonl", "user_id": site.bob[0]}, headers=ADMIN
    )
    lines = [orjson.loads(line) for line in exported.text.splitlines()]
    assert len(lines) == 1 and "秘密" in orjson.dumps(lines[0]).decode()


async def test_the_admin_lists_everyones_history_with_filters_and_exports_a_conversation(
    site: Site,
) -> None:
    admin = site.gateway.client

    async def listed(path: str, **params: Any) -> list[dict[str, Any]]:
        """Every page of ``path``, one record a page, by its cursor."""
        found: list[dict[str, Any]] = []
        while True:
            page = (await admin.get(path, params={**params, "limit": 1}, headers=ADMIN)).json()
            found += page["data"]
            if not page["has_more"]:
                return found
            params["after"] = page["last_id"]

    everyone = await listed("/admin/completions")
    per_user = [
        (await admin.get(f"/admin/users/{user}/completions", headers=ADMIN)).json()["data"]
        for user in (site.ann[0], site.bob[0])
    ]
    assert sorted(r["id"] for r in everyone) == sorted(r["id"] for page in per_user for r in page)
    assert [r["started_at"] for r in everyone] == sorted(
        (r["started_at"] for r in everyone), reverse=True
    )
    assert {r["user_id"] for r in everyone} == {site.ann[0], site.bob[0]}
    assert await listed("/admin/completions", user_id=site.bob[0]) == per_user[1]
    assert [r["user_id"] for r in await listed("/admin/completions", model="gpt-4o")] == [
        site.bob[0]
    ]
    oldest = await listed("/admin/completions", order="asc")
    assert oldest == everyone[::-1]
    conversations = await listed("/admin/conversations")
    assert {c["user_id"] for c in conversations} == {site.ann[0], site.bob[0]}
    (trip,) = [c for c in conversations if c["title"] == "plan a trip to 北京"]
    assert await listed("/admin/conversations", user_id=site.bob[0]) == [
        c for c in conversations if c["user_id"] == site.bob[0]
    ]
    exported = await admin.get(
        "/admin/export", params={"conversation_id": trip["id"]}, headers=ADMIN
    )
    lines = [orjson.loads(line) for line in exported.text.splitlines()]
    assert len(lines) == trip["completion_count"] >= 2
    assert {line["conversation_id"] for line in lines} == {trip["id"]}


async def test_a_user_reads_their_own_conversations_search_and_stats_and_nobody_elses(
    site: Site,
) -> None:
    admin = site.gateway.client
    everyone = (await admin.get("/admin/conversations", headers=ADMIN)).json()["data"]
    (trip,) = [c for c in everyone if c["title"] == "plan a trip to 北京"]
    async with site.gateway.as_user(site.bob[1]) as bob, site.gateway.as_user(site.ann[1]) as ann:
        mine = (await bob.get("/me/conversations")).json()["data"]
        assert mine == [c for c in everyone if c["user_id"] == site.bob[0]] and mine
        one = (await bob.get(f"/me/conversations/{mine[0]['id']}")).json()
        assert one["user_id"] == site.bob[0] and "秘密" in orjson.dumps(one["thread"]).decode()
        assert (await bob.get(f"/me/conversations/{trip['id']}")).status_code == 404
        assert (await ann.get(f"/me/conversations/{trip['id']}")).json()["id"] == trip["id"]
        completions = (await bob.get("/me/completions")).json()["data"]
        assert {r["user_id"] for r in completions} == {site.bob[0]} and len(completions) == 1
        hits = (await bob.get("/me/search", params={"q": "秘密"})).json()["data"]
        assert hits and {hit["user_id"] for hit in hits} == {site.bob[0]}
        assert (await ann.get("/me/search", params={"q": "秘密"})).json()["data"] == []
        stats = (await bob.get("/me/stats", params={"by": "user"})).json()["data"]
        assert [(row["key"], row["requests"]) for row in stats] == [(site.bob[0], 1)]
    async with site.gateway.as_user("not-a-key") as stranger:
        assert (await stranger.get("/me/conversations")).status_code == 401
    assert (await admin.get("/me/conversations")).status_code == 401  # no key at all


async def test_the_viewer_shows_a_user_their_own_history_and_nobody_elses(site: Site) -> None:
    client = await site.gateway.signed_in(site.bob[1])
    home = await client.get("/ui/")
    assert home.status_code == 303 and home.headers["location"] == f"/ui/users/{site.bob[0]}"
    own = await client.get(f"/ui/users/{site.bob[0]}")
    assert own.status_code == 200 and "秘密" in own.text
    others = await client.get(f"/ui/users/{site.ann[0]}")
    assert others.status_code == 404 and "<h1>Not found</h1>" in others.text
    theirs = await client.get("/ui/search", params={"q": "北京"})
    assert theirs.status_code == 200 and "0 messages contain" in theirs.text
    mine = await client.get("/ui/search", params={"q": "秘密"})
    assert mine.status_code == 200 and "0 messages contain" not in mine.text
    assert "<mark>秘密</mark>" in mine.text


async def test_the_admin_signs_in_to_the_viewer_and_sees_every_page(site: Site) -> None:
    client = await site.gateway.signed_in(ADMIN_KEY)
    users = await client.get("/ui/")
    assert users.status_code == 200 and site.ann[0] in users.text and site.bob[0] in users.text
    for page in ("/ui/stats", "/ui/errors", f"/ui/users/{site.ann[0]}"):
        answer = await client.get(page)
        assert answer.status_code == 200, page
