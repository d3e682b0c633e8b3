"""The README's first command, and the real ``openai`` SDK: through the gateway it gets what
it gets from the upstream directly, streamed or not, tool calls and usage included."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    },
]
REQUESTS: dict[str, dict[str, Any]] = {
    "text": {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in Chinese: 你好"}],
    },
    "tools": {
        "model": "gpt-4o-mini",
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "Look up the weather"}],
    },
    "parts": {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }
        ],
    },
}


@pytest.fixture(scope="module")
def gateway(upstream: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # Exactly the README's first command: no database settings, SQLite in the working folder.
    with GatewayProcess(
        {"UPSTREAM_BASE_URL": upstream.base_url}, tmp_path_factory.mktemp("readme")
    ) as process:
        yield process


def clients(upstream: Any, gateway: GatewayProcess) -> tuple[openai.OpenAI, openai.OpenAI]:
    return (
        openai.OpenAI(base_url=upstream.base_url, api_key="sk-test", max_retries=0),
        openai.OpenAI(base_url=gateway.base_url, api_key="sk-test", max_retries=0),
    )


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_sync_sdk_gets_the_same_completion_through_the_gateway(
    upstream: Any, gateway: GatewayProcess, name: str
) -> None:
    direct, proxied = clients(upstream, gateway)
    expected = direct.chat.completions.create(**REQUESTS[name])
    got = proxied.chat.completions.create(**REQUESTS[name])
    assert got.model_dump() == expected.model_dump()
    assert got.choices[0].message.content or got.choices[0].message.tool_calls


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_sync_sdk_gets_the_same_stream_through_the_gateway(
    upstream: Any, gateway: GatewayProcess, name: str, include_usage: bool
) -> None:
    direct, proxied = clients(upstream, gateway)
    options: dict[str, Any] = {"stream": True}
    if include_usage:
        options["stream_options"] = {"include_usage": True}
    expected = [c.model_dump() for c in direct.chat.completions.create(**REQUESTS[name], **options)]
    got = [c.model_dump() for c in proxied.chat.completions.create(**REQUESTS[name], **options)]
    assert got == expected
    assert any(chunk["usage"] for chunk in got) is include_usage


@pytest.mark.parametrize("stream", [False, True])
async def test_async_sdk_gets_the_same_answers_through_the_gateway(
    upstream: Any, gateway: GatewayProcess, stream: bool
) -> None:
    direct = openai.AsyncOpenAI(base_url=upstream.base_url, api_key="sk-test", max_retries=0)
    proxied = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-test", max_retries=0)
    for request in REQUESTS.values():
        if stream:
            expected = [
                c.model_dump()
                async for c in await direct.chat.completions.create(**request, stream=True)
            ]
            got = [
                c.model_dump()
                async for c in await proxied.chat.completions.create(**request, stream=True)
            ]
        else:
            expected = (await direct.chat.completions.create(**request)).model_dump()
            got = (await proxied.chat.completions.create(**request)).model_dump()
        assert got == expected
    await direct.close()
    await proxied.close()


def raw_stream(base_url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    with httpx.stream(
        "POST",
        base_url + "/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sk-test"},
    ) as response:
        return response.status_code, response.read()


def test_a_stream_that_asked_for_usage_is_relayed_byte_for_byte(
    upstream: Any, gateway: GatewayProcess
) -> None:
    body = {**REQUESTS["tools"], "stream": True, "stream_options": {"include_usage": True}}
    assert raw_stream(gateway.base_url, body) == raw_stream(upstream.base_url, body)


def test_the_usage_event_the_gateway_asked_for_is_removed_and_nothing_else(
    upstream: Any, gateway: GatewayProcess
) -> None:
    body = {**REQUESTS["text"], "stream": True}
    _, direct = raw_stream(upstream.base_url, body)
    _, proxied = raw_stream(gateway.base_url, body)
    _, with_usage = raw_stream(
        upstream.base_url, {**body, "stream_options": {"include_usage": True}}
    )
    events = with_usage.split(b"\n\n")
    # Asking for usage adds an event and a "usage": null in every other chunk: both go.
    assert b'"choices":[]' in with_usage and b'"usage":null' in with_usage
    assert len(events) > len(proxied.split(b"\n\n"))
    assert proxied == direct
    assert b'"usage"' not in proxied
    assert proxied.endswith(b"data: [DONE]\n\n")


async def test_the_readme_default_writes_history_to_a_local_sqlite_file(
    upstream: Any, gateway: GatewayProcess
) -> None:
    _, proxied = clients(upstream, gateway)
    marker = "remember this sentence 42"
    completion = proxied.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": marker}], user="alice"
    )
    db = HistoryDB(str(gateway.workdir / "mes_gateway.db"))
    try:
        for _ in range(100):
            rows = [r for r in await db.completions() if r["response_id"] == completion.id]
            if rows:
                break
            await asyncio.sleep(0.05)
        assert len(rows) == 1
        request, answer = await db.request_and_answer(rows[0])
        assert request == [{"role": "user", "content": marker}]
        assert answer["content"] == completion.choices[0].message.content
        assert rows[0]["end_user"] == "alice"
        assert rows[0]["total_tokens"] == completion.usage.total_tokens
    finally:
        await db.close()


def test_other_v1_routes_are_proxied_transparently_and_logged(
    upstream: Any, gateway: GatewayProcess
) -> None:
    direct, proxied = clients(upstream, gateway)
    assert proxied.models.list().model_dump() == direct.models.list().model_dump()
    expected = direct.embeddings.create(model="text-embedding-3-small", input="hi")
    assert proxied.embeddings.create(model="text-embedding-3-small", input="hi") == expected


def test_upstream_cookies_reach_the_client_and_are_never_replayed_for_the_next_caller(
    upstream: Any, gateway: GatewayProcess
) -> None:
    """The upstream sets a cookie on every answer (OpenAI's do): the gateway relays it to
    the client, and its connection pool does not keep it and send it on someone else's
    request (httpx's client would have)."""
    httpx.delete(upstream.root + "/_fake/requests")
    first = httpx.post(
        gateway.base_url + "/chat/completions",
        json=REQUESTS["text"],
        headers={"Authorization": "Bearer sk-one"},
    )
    assert first.status_code == 200
    assert "_cfuvid=fake-cookie" in first.headers["set-cookie"]
    second = httpx.get(gateway.base_url + "/models", headers={"Authorization": "Bearer sk-two"})
    assert second.status_code == 200
    received = httpx.get(upstream.root + "/_fake/requests").json()
    assert [r["path"] for r in received] == ["/v1/chat/completions", "/v1/models"]
    assert all("cookie" not in request["headers"] for request in received)
