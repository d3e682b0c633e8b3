"""The history viewer in a real browser (Playwright driving Debian's Chromium): signing in,
a conversation with tool calls, a search in Chinese, paging, and a stored script that must
not run. Screenshots of every page go to test-output/ui/ for a person to look at."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import unavailable
from tests.managed import ADMIN_KEY, Member, managed_gateway, new_member

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "test-output" / "ui"
CHROMIUM = "/usr/bin/chromium"
SCRIPT = '<script>window.__pwned = 1; alert("stored")</script><img src=x onerror="alert(2)">'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def chat(gateway: Any, member: Member, messages: list[Any], **extra: Any) -> dict[str, Any]:
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {member.key}"},
        json={"model": "gpt-4o-mini", "messages": messages, **extra},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


class Site:
    def __init__(self, gateway: Any, ann: Member, bob: Member) -> None:
        self.gateway, self.ann, self.bob = gateway, ann, bob
        self.url = gateway.url

    def anns_conversation(self, word: str) -> str:
        """The id of Ann's conversation whose title holds ``word`` (asked of the admin API)."""
        admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        listed = admin.get(f"/admin/users/{self.ann.user_id}/conversations", params={"limit": 100})
        return str(next(c["id"] for c in listed.json()["data"] if word in (c["title"] or "")))


@pytest.fixture(scope="module")
def site(upstream: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("ui-browser")
    with managed_gateway(upstream, str(workdir / "history.db"), workdir) as gateway:
        ann, bob = new_member(gateway, "ann"), new_member(gateway, "bob")
        # A conversation with a tool call, its result, and the answer after it.
        asked = [
            {"role": "system", "content": "You are a weather assistant."},
            {"role": "user", "content": "What's the weather in Oslo? And 明天北京的天气怎么样?"},
        ]
        called = chat(gateway, ann, asked, tools=TOOLS)["choices"][0]["message"]
        call_id = called["tool_calls"][0]["id"]
        result = {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": -3}'}
        chat(gateway, ann, [*asked, called, result], tools=TOOLS)
        chat(gateway, ann, [{"role": "user", "content": SCRIPT}])
        picture = [  # an image by reference, and one inline
            {"type": "text", "text": "What is in these pictures?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]
        chat(gateway, ann, [{"role": "user", "content": picture}])
        for n in range(60):  # more than a page of conversations
            chat(gateway, ann, [{"role": "user", "content": f"Short question number {n}"}])
        chat(gateway, bob, [{"role": "user", "content": "Bob asks about 量子计算机"}])
        refused = httpx.post(  # an upstream error, for the errors page
            gateway.base_url + "/chat/completions",
            headers={"Authorization": f"Bearer {bob.key}", "X-Fake-Status": "429"},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Too many?"}]},
        )
        assert refused.status_code == 429
        written = 0
        deadline = time.monotonic() + 60
        while written < 66 and time.monotonic() < deadline:
            time.sleep(0.1)
            with sqlite3.connect(workdir / "history.db") as db:
                written = db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
        assert written == 66
        yield Site(gateway, ann, bob)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
        raise
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


def signed_in(browser: Any, site: Site, key: str, width: int = 1100) -> Any:
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(site.url + "/ui/")
    assert "/ui/login" in page.url
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    return page


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_an_admin_signs_in_and_reads_a_conversation_with_tool_calls(
    browser: Any, site: Site
) -> None:
    page = signed_in(browser, site, ADMIN_KEY)
    assert page.url.endswith("/ui/")
    users = page.locator("table").inner_text()
    assert site.ann.user_id in users and site.bob.user_id in users
    shot(page, "users")
    page.click(f"text={site.ann.user_id}")
    page.wait_for_load_state()
    shot(page, "conversations")
    # The tool conversation is the oldest: on the second page, newest first.
    page.click("text=Older conversations")
    page.wait_for_load_state()
    page.click("text=What's the weather in Oslo?")
    page.wait_for_load_state()
    thread = page.locator("main").inner_text()
    assert "get_weather" in thread and "CALLS" in thread.upper()
    assert '{"temp_c": -3}' in thread  # the tool's result, as sent
    assert "TOOL" in thread.upper() and "SYSTEM" in thread.upper()
    assert "gpt-4o-mini" in thread and "HTTP 200" in thread
    shot(page, "conversation")
    page.goto(site.url + "/ui/stats")
    assert page.locator(".bar").count() >= 2
    shot(page, "stats")
    page.goto(site.url + "/ui/errors")
    assert "429" in page.locator("table").first.inner_text()
    shot(page, "errors")
    page.context.close()


def test_a_stored_script_shows_as_text_and_never_runs(browser: Any, site: Site) -> None:
    scripted = site.anns_conversation("__pwned")
    page = signed_in(browser, site, site.ann.key)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(site.url + f"/ui/conversations/{scripted}")
    assert "<script>window.__pwned = 1;" in page.locator("main").inner_text()
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main script, main img").count() == 0
    assert dialogs == []
    shot(page, "stored-script")
    page.context.close()


def test_searching_a_chinese_phrase_highlights_it_in_the_users_own_history(
    browser: Any, site: Site
) -> None:
    page = signed_in(browser, site, site.ann.key)
    page.goto(site.url + "/ui/search")
    page.fill("input[type=search]", "北京的天气")
    page.press("input[type=search]", "Enter")
    page.wait_for_load_state()
    marks = page.locator("mark").all_inner_texts()
    assert marks and all(mark == "北京的天气" for mark in marks)
    shot(page, "search")
    page.goto(site.url + "/ui/search?q=" + "量子计算机")
    assert page.locator("mark").count() == 0  # Bob's words: not in Ann's history
    page.context.close()


def test_paging_through_a_long_list_on_a_phone(browser: Any, site: Site) -> None:
    page = signed_in(browser, site, site.ann.key, width=390)
    assert page.url.endswith(f"/ui/users/{site.ann.user_id}")
    first = page.locator("tbody tr").count()
    shot(page, "conversations-phone")
    page.click("text=Older conversations")
    page.wait_for_load_state()
    second = page.locator("tbody tr").count()
    assert (first, second) == (50, 63 - 50)
    assert not page.locator("text=Older conversations").count()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    page.context.close()


def test_images_show_by_reference_and_are_never_loaded(browser: Any, site: Site) -> None:
    pictures = site.anns_conversation("pictures")
    page = signed_in(browser, site, site.ann.key)
    loaded: list[str] = []
    page.on("request", lambda request: loaded.append(request.url))
    page.goto(site.url + f"/ui/conversations/{pictures}")
    link = page.locator("a[href='https://example.com/cat.png']")
    assert link.count() == 1 and link.get_attribute("rel") == "noreferrer noopener nofollow"
    assert "image: inline" in page.locator("main").inner_text()
    assert not [url for url in loaded if "example.com" in url]  # shown as a link, not fetched
    shot(page, "images")
    page.context.close()


def test_another_users_conversation_is_not_found_in_the_page(browser: Any, site: Site) -> None:
    admin = httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    bobs = admin.get(f"/admin/users/{site.bob.user_id}/conversations").json()["data"][0]["id"]
    page = signed_in(browser, site, site.ann.key)
    response = page.goto(site.url + f"/ui/conversations/{bobs}")
    assert response is not None and response.status == 404
    assert "Not found" in page.locator("h1").inner_text()
    assert "量子计算机" not in page.content()
    page.context.close()
