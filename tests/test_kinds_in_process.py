"""Every kind of call read back, in process (the fast tier): a Responses conversation in the
viewer as a thread (its items, the tool's call and output, the reasoning summary), request
logs through the admin API with their filters and pages, and the viewer's errors and
statistics covering the routes that are only logged."""

from __future__ import annotations

import asyncio
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
TOOLS: list[Any] = [{"type": "function", "name": "lookup_order", "parameters": {"type": "object"}}]


@dataclass
class Site:
    gateway: Gateway
    user: tuple[str, str]
    answer: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    async with gateway(tmp_path_factory.mktemp("kinds")) as running:
        user = await running.new_user("agent")
        client = openai.AsyncOpenAI(
            base_url="http://gateway.test/v1",
            api_key=user[1],
            http_client=running.as_user(user[1]),
            max_retries=0,
        )
        first = await client.responses.create(
            model="gpt-5",
            input="where is order 77?",
            tools=TOOLS,
            reasoning={"effort": "low", "summary": "auto"},
        )
        call = next(item for item in first.output if item.type == "function_call")
        second = await client.responses.create(
            model="gpt-5",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "in Oslo"}],
            tools=TOOLS,
        )
        async with running.as_user(user[1]) as raw:
            for path in ("/v1/models", f"/v1/responses/{first.id}", "/v1/responses/resp_gone99"):
                await raw.get(path)
            await raw.post("/v1/moderations", json={"input": "x"})
        await running.written(6)
        yield Site(running, user, second.output_text)


async def test_a_responses_conversation_is_a_thread_in_the_viewer(site: Site) -> None:
    admin = site.gateway.client
    listed = await admin.get(f"/admin/users/{site.user[0]}/conversations", headers=ADMIN)
    (conversation,) = listed.json()["data"]
    assert conversation["call_type"] == "responses" and conversation["completion_count"] == 2
    browser = await site.gateway.signed_in(site.user[1])
    page = (await browser.get(f"/ui/conversations/{conversation['id']}")).text
    for shown in ("where is order 77?", "lookup_order", "result of call_", "in Oslo", site.answer):
        assert shown in page, shown
    assert "responses ·" in page
    reasoning = page.index('class="message reasoning"')
    assert reasoning < page.index("lookup_order")  # the summary, before the call it led to


async def test_request_logs_are_listed_filtered_and_paged(site: Site) -> None:
    admin = site.gateway.client
    every = (await admin.get("/admin/request-logs", headers=ADMIN)).json()
    assert [(r["method"], r["status_code"]) for r in every["data"]] == [
        ("POST", 404),
        ("GET", 404),
        ("GET", 200),
        ("GET", 200),
    ]
    assert {r["user_id"] for r in every["data"]} == {site.user[0]}
    errors = await admin.get("/admin/request-logs", params={"errors_only": "true"}, headers=ADMIN)
    assert {r["path"] for r in errors.json()["data"]} == {
        "/v1/moderations",
        "/v1/responses/resp_gone99",
    }
    prefixed = await admin.get(
        "/admin/request-logs", params={"path": "/v1/responses/*", "order": "asc"}, headers=ADMIN
    )
    assert [r["status_code"] for r in prefixed.json()["data"]] == [200, 404]
    pages, after = [], None
    while True:
        params = {"limit": 1, **({"after": after} if after else {})}
        page = (await admin.get("/admin/request-logs", params=params, headers=ADMIN)).json()
        pages += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == every["data"]
    nobody = await admin.get("/admin/request-logs", params={"user_id": "someone"}, headers=ADMIN)
    assert nobody.json()["data"] == []
    unknown = await admin.get("/admin/request-logs", params={"after": "nope"}, headers=ADMIN)
    assert unknown.status_code == 404


async def test_the_viewers_errors_and_statistics_cover_every_route(site: Site) -> None:
    browser = await site.gateway.signed_in(ADMIN_KEY)
    errors = (await browser.get("/ui/errors")).text
    assert "POST /v1/moderations" in errors and "GET /v1/responses/resp_gone99" in errors
    stats = (await browser.get("/ui/stats")).text
    assert "GET /v1/responses/{id}" in stats and "GET /v1/models" in stats


@pytest.mark.parametrize(
    ("path", "body", "last"),
    [
        ("/v1/responses", {"model": "m", "input": "hi", "stream": True}, b"response.completed"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
            b"[DONE]",
        ),
        ("/v1/completions", {"model": "m", "prompt": "hi", "stream": True}, b"[DONE]"),
    ],
)
async def test_a_streams_closing_event_reaches_the_client_after_its_record_is_spooled(
    site: Site, path: str, body: dict[str, Any], last: bytes
) -> None:
    proxy = site.gateway.services.proxy
    spooled = proxy.capture
    seen_at_spool: list[bytes] = []
    received = bytearray()  # what went to the client, at the ASGI boundary

    def capture(record: Any) -> bool:
        seen_at_spool.append(bytes(received))
        return spooled(record)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            received.extend(message.get("body", b""))

    sent = orjson.dumps(body)
    requests = [{"type": "http.request", "body": sent, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays until the answer ends
        raise AssertionError("unreachable")

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {site.user[1]}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(sent)).encode()),
        ],
        "client": ("127.0.0.1", 5000),
    }
    proxy.capture = capture
    try:
        await proxy(scope, receive, send)
    finally:
        proxy.capture = spooled
    assert len(seen_at_spool) == 1
    assert last in received and last not in seen_at_spool[0]


async def test_a_conversation_the_client_names_reads_as_one_thread(site: Site) -> None:
    running = site.gateway
    await running.settled()  # the tests before spool records they do not wait for
    before = running.services.writer.counters()["records_written"]
    sent: list[Any] = []
    async with running.as_user(site.user[1]) as client:
        for question in ("first question", "second question", "third question"):
            item = {"role": "user", "content": question}
            answer = await client.post(
                "/v1/responses",
                json={"model": "m", "input": [item], "conversation": "conv_trip"},
            )
            sent += [item, *answer.json()["output"]]
    await running.written(before + 3)
    admin = running.client
    listed = await admin.get(f"/admin/users/{site.user[0]}/conversations", headers=ADMIN)
    named = [c for c in listed.json()["data"] if c["client_conversation_id"] == "conv_trip"]
    assert len(named) == 1 and named[0]["completion_count"] == 3
    detail = await admin.get(f"/admin/conversations/{named[0]['id']}", headers=ADMIN)
    assert detail.json()["thread"] == sent
