"""The history viewer at /ui, over HTTP: who may sign in, what each sees, and that stored
text is shown as text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB
from tests.managed import ADMIN, ADMIN_KEY, Member, managed_gateway, new_member

SCRIPT = '<script>window.__pwned = 1; alert("stored")</script><img src=x onerror="alert(2)">'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


class Site:
    def __init__(self, gateway: GatewayProcess, dsn: str, ann: Member, bob: Member) -> None:
        self.gateway, self.dsn, self.ann, self.bob = gateway, dsn, ann, bob

    def chat(self, member: Member, content: str, **extra: Any) -> dict[str, Any]:
        response = httpx.post(
            self.gateway.base_url + "/chat/completions",
            headers={"Authorization": f"Bearer {member.key}"},
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": content}],
                **extra,
            },
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def browser(self, key: str) -> httpx.Client:
        client = httpx.Client(base_url=self.gateway.url, follow_redirects=False)
        signed = client.post("/ui/login", data={"key": key, "next": "/ui/"})
        assert signed.status_code == 303, signed.text
        return client

    def conversation_of(self, db_rows: list[Any], owner: str) -> str:
        return str(next(row["conversation_id"] for row in db_rows if row["owner"] == owner))


@pytest.fixture(scope="module")
def site(upstream: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("ui")
    dsn = str(workdir / "history.db")
    with managed_gateway(upstream, dsn, workdir) as gateway:
        site = Site(gateway, dsn, new_member(gateway, "ann"), new_member(gateway, "bob"))
        site.chat(site.ann, "What is the weather in 東京 today?", tools=[WEATHER_TOOL])
        site.chat(site.ann, SCRIPT)
        site.chat(site.bob, "Bob's private question about 量子计算")
        yield site


async def rows(site: Site, expected: int) -> list[Any]:
    db = HistoryDB(site.dsn)
    try:
        assert await db.wait_for("completions", expected) == expected
        return await db.completions()
    finally:
        await db.close()


def test_pages_need_signing_in_and_a_wrong_key_is_refused(site: Site) -> None:
    client = httpx.Client(base_url=site.gateway.url)
    bare = client.get("/ui")  # as the README writes it
    assert bare.status_code == 307 and bare.headers["location"] == "/ui/"
    for path in ("/ui/", "/ui/stats", "/ui/search?q=x", "/ui/export"):
        response = client.get(path)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/ui/login?next=")
    refused = client.post("/ui/login", data={"key": "sk-wrong"})
    assert refused.status_code == 401 and "not accepted" in refused.text
    assert "mes_ui" not in refused.cookies
    forged = httpx.Client(base_url=site.gateway.url, cookies={"mes_ui": "eyJhIjp0cnVlfQ.AAAA"})
    assert forged.get("/ui/").status_code == 303


async def test_the_admin_sees_every_user_and_stored_markup_shows_as_text(site: Site) -> None:
    stored = await rows(site, 3)
    admin = site.browser(ADMIN_KEY)
    users = admin.get("/ui/")
    assert users.status_code == 200
    assert site.ann.user_id in users.text and site.bob.user_id in users.text
    assert "default-src 'none'" in users.headers["content-security-policy"]
    page = admin.get(f"/ui/users/{site.ann.user_id}")
    assert page.status_code == 200 and "What is the weather in 東京 today?" in page.text
    threads = [
        admin.get(f"/ui/conversations/{row['conversation_id']}").text
        for row in stored
        if row["owner"] == site.ann.user_id
    ]
    weather = next(text for text in threads if "東京" in text)
    assert "get_weather" in weather and "calls" in weather  # the answer's tool call
    scripted = next(text for text in threads if "pwned" in text)
    assert "&lt;script&gt;window.__pwned = 1;" in scripted
    assert "&lt;img src=x onerror=" in scripted
    assert "<script" not in scripted and "<img" not in scripted


async def test_a_user_sees_only_their_own_history(site: Site) -> None:
    stored = await rows(site, 3)
    bobs = site.conversation_of(stored, site.bob.user_id)
    anns = site.conversation_of(stored, site.ann.user_id)
    ann = site.browser(site.ann.key)
    home = ann.get("/ui/")
    assert home.status_code == 303 and home.headers["location"] == f"/ui/users/{site.ann.user_id}"
    assert ann.get(f"/ui/conversations/{anns}").status_code == 200
    assert ann.get(f"/ui/conversations/{bobs}").status_code == 404
    assert ann.get(f"/ui/users/{site.bob.user_id}").status_code == 404
    assert ann.get(f"/ui/export?user_id={site.bob.user_id}").status_code == 404
    searched = ann.get("/ui/search", params={"q": "量子计算"}).text
    assert "0 messages contain" in searched and "Bob" not in searched
    exported = ann.get("/ui/export").text
    assert "東京" in exported and "量子计算" not in exported
    bob = site.browser(site.bob.key)
    found = bob.get("/ui/search", params={"q": "量子计算"})
    assert "<mark>量子计算</mark>" in found.text
    assert "Bob&#39;s private question about" in found.text


def test_a_revoked_key_loses_the_viewer_at_once(site: Site) -> None:
    carol = new_member(site.gateway, "carol")
    viewer = site.browser(carol.key)
    assert viewer.get(f"/ui/users/{carol.user_id}").status_code == 200
    revoked = httpx.post(site.gateway.url + f"/admin/keys/{carol.key_id}/revoke", headers=ADMIN)
    assert revoked.status_code == 200
    assert viewer.get(f"/ui/users/{carol.user_id}").status_code == 303


def test_statistics_and_errors_pages_render(site: Site) -> None:
    admin = site.browser(ADMIN_KEY)
    page = admin.get("/ui/stats")
    assert (
        page.status_code == 200 and "Requests per day" in page.text and "gpt-4o-mini" in page.text
    )
    assert admin.get("/ui/errors").status_code == 200
    assert admin.get("/ui/stats?days=nonsense").status_code == 200
