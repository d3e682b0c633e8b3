"""Anthropic's Messages API through the gateway, in process (the fast tier): the ``anthropic``
SDK gets what the upstream sent, streamed and not; each call is recorded whole (system,
messages, thinking with its signature, tool calls, stop reason, cache reads and writes); a
cut stream is rebuilt from its deltas; a Claude Code-like loop is one conversation whose
storage grows linearly; keys go where they should."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import orjson
import pytest
import pytest_asyncio
from genai_prices import Usage, calc_price

from fake_upstream.app import FakeUpstream
from tests.in_process import ADMIN_KEY, Gateway, gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

ENV = {
    "UPSTREAMS": "openai,claude",
    "UPSTREAM_OPENAI_BASE_URL": "http://openai.test/v1",
    "UPSTREAM_OPENAI_API_KEY": "sk-openai",
    "UPSTREAM_OPENAI_MODELS": "gpt-*",
    "UPSTREAM_CLAUDE_BASE_URL": "http://claude.test/v1",
    "UPSTREAM_CLAUDE_API_KEY": "sk-ant-gateway",
    "UPSTREAM_CLAUDE_MODELS": "claude-*",
    "UPSTREAM_CLAUDE_FORMAT": "anthropic",
}
MODEL = "claude-sonnet-4-5"
TOOLS: list[Any] = [
    {"name": "read_file", "description": "Read", "input_schema": {"type": "object"}}
]
CACHED = {"type": "ephemeral"}


class Site:
    def __init__(self, running: Gateway, claude: FakeUpstream, key: str) -> None:
        self.gateway, self.claude, self.key = running, claude, key

    def client(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url="http://gateway.test",
            api_key=self.key,
            # The anthropic SDK is on httpx2: the same app, through its ASGI transport.
            http_client=httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=self.gateway.client._transport.app)
            ),
            max_retries=0,
        )

    def direct(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url="http://claude.test",
            api_key="sk-ant-gateway",
            http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.claude)),
            max_retries=0,
        )

    async def settled(self) -> set[str]:
        """The completions' ids, once every record captured so far is written."""
        await self.gateway.written(self.gateway.services.metrics.counters["records_captured"])
        return {row["id"] for row in await self.gateway.history.completions()}

    async def rows(self, before: set[str]) -> list[dict[str, Any]]:
        """The completions recorded since ``before``, in order."""
        await self.settled()
        rows = [dict(r) for r in await self.gateway.history.completions() if r["id"] not in before]
        return sorted(rows, key=lambda row: row["started_at"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    claude = FakeUpstream()
    fakes = {"openai.test": FakeUpstream(), "claude.test": claude}
    async with gateway(tmp_path_factory.mktemp("messages"), env=ENV, fakes=fakes) as running:
        _, key = await running.new_user("coder")
        yield Site(running, claude, key)


async def _thread(site: Site, conversation: str) -> list[Any]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    found = await site.gateway.client.get(f"/admin/conversations/{conversation}", headers=admin)
    assert found.status_code == 200, found.text
    return [item["message"] for item in found.json()["messages"]]


async def test_answers_reach_the_client_as_the_upstream_sent_them(site: Site) -> None:
    asked: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 200,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "name three rivers"}],
    }
    whole = await site.client().messages.with_raw_response.create(**asked)
    direct = await site.direct().messages.with_raw_response.create(**asked)
    assert whole.http_response.content == direct.http_response.content
    async with site.client().messages.stream(**asked) as stream:
        events = [event.model_dump() async for event in stream]
    async with site.direct().messages.stream(**asked) as stream:
        assert events == [event.model_dump() async for event in stream]
    before = len(site.claude.received)
    counted = await site.client().messages.count_tokens(model=MODEL, messages=asked["messages"])
    assert counted.input_tokens > 0
    assert site.claude.received[before][1] == "/v1/messages/count_tokens"


async def test_a_call_is_recorded_whole(site: Site) -> None:
    before = await site.settled()
    system = [{"type": "text", "text": "You edit code.", "cache_control": CACHED}]
    asked: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 500,
        "system": system,
        "tools": TOOLS,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "open main.py"}],
    }
    whole = await site.client().messages.create(**asked)
    async with site.client().messages.stream(**asked) as stream:
        streamed = await stream.get_final_message()
    rows = await site.rows(before)
    for row, answer in zip(rows, (whole, streamed), strict=True):
        assert row["call_type"] == "messages"
        assert row["upstream"] == "claude"
        assert row["response_id"] == answer.id
        assert row["finish_reason"] == "tool_use"
        usage = answer.usage
        cache_write = usage.cache_creation_input_tokens or 0
        assert cache_write > 0  # the first turn of a cached system prompt writes the cache
        assert row["prompt_tokens"] == usage.input_tokens + cache_write
        assert row["cache_write_tokens"] == cache_write
        assert row["cached_tokens"] == 0
        assert row["completion_tokens"] == usage.output_tokens
        assert row["total_tokens"] == row["prompt_tokens"] + usage.output_tokens
        assert orjson.loads(row["params"])["tools"] == TOOLS
        own = calc_price(
            Usage(
                input_tokens=row["prompt_tokens"],
                cache_write_tokens=cache_write,
                output_tokens=usage.output_tokens,
            ),
            MODEL,
            provider_id="anthropic",
            genai_request_timestamp=row["started_at"].replace(tzinfo=UTC),
        )
        assert row["cost_usd"] == pytest.approx(float(own.total_price), rel=1e-3)
        thread = await _thread(site, row["conversation_id"])
        # stored without its cache marker; the request, rebuilt, has it back
        assert thread[0] == {
            "role": "system",
            "content": [{"type": "text", "text": "You edit code."}],
        }
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        detail = await site.gateway.client.get(f"/admin/completions/{row['id']}", headers=admin)
        assert detail.json()["request"] == [
            {"role": "system", "content": system},
            *asked["messages"],
        ]
        assert thread[1] == asked["messages"][0]
        assert thread[2] == {
            "role": "assistant",
            "content": [block.model_dump(exclude_none=True) for block in answer.content],
        }
        assert thread[2]["content"][0]["signature"].startswith("sig_")


async def test_a_stream_cut_short_is_rebuilt_from_its_deltas(site: Site) -> None:
    before = await site.settled()
    body = {
        "model": MODEL,
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "tell me about the sea"}],
    }
    async with site.gateway.as_user(site.key) as client:
        # message_start, block start, ping, two text deltas: then the upstream breaks
        answer = await client.post("/v1/messages", json=body, headers={"X-Fake-Reset-After": "5"})
    assert b"message_stop" not in answer.content
    (row,) = await site.rows(before)
    assert row["finish_reason"] == "upstream_disconnected"
    thread = await _thread(site, row["conversation_id"])
    assert thread[-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Echo: tell me about the sea 你好,"}],
    }
    assert row["prompt_tokens"] is not None  # message_start's usage came


async def test_a_coding_loop_is_one_conversation_stored_linearly(site: Site) -> None:
    """Claude Code's way: every turn resends the whole history, the cache marker on its
    last message only, tool results answering tool calls."""
    before = await site.settled()
    system = [{"type": "text", "text": "You are a coding agent.", "cache_control": CACHED}]
    history: list[dict[str, Any]] = []
    requests: list[list[dict[str, Any]]] = []
    client = site.client()
    turns = 16
    for turn in range(turns):
        if turn % 2 == 0:
            history.append({"role": "user", "content": [{"type": "text", "text": f"step {turn}"}]})
        sent = [dict(message) for message in history]
        last = dict(sent[-1])
        last["content"] = [{**block, "cache_control": CACHED} for block in last["content"]]
        sent[-1] = last
        requests.append([{"role": "system", "content": system}, *sent])
        answer = await client.messages.create(
            model=MODEL, max_tokens=300, system=system, tools=TOOLS, messages=sent
        )
        blocks = [block.model_dump(exclude_none=True) for block in answer.content]
        history.append({"role": "assistant", "content": blocks})
        call = next((b for b in blocks if b["type"] == "tool_use"), None)
        if call is not None:
            result = {"type": "tool_result", "tool_use_id": call["id"], "content": "ok"}
            history.append({"role": "user", "content": [result]})
    rows = await site.rows(before)
    assert len({row["conversation_id"] for row in rows}) == 1
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    conversation = await site.gateway.client.get(
        f"/admin/conversations/{rows[0]['conversation_id']}", headers=admin
    )
    assert conversation.json()["completion_count"] == turns
    # Every message once, whichever turn carried its cache marker: what each turn resent
    # would have taken the sum of their lengths.
    stored = conversation.json()["message_count"]
    assert stored == 1 + len(history)
    assert stored < sum(row["request_message_count"] + 1 for row in rows) / 4
    for row, sent in zip(rows, requests, strict=True):  # each request as sent, markers too
        detail = await site.gateway.client.get(f"/admin/completions/{row['id']}", headers=admin)
        assert detail.json()["request"] == sent
        assert "__cache_marks" not in detail.json()["params"]
    assert rows[-1]["cached_tokens"] > 0  # later turns read the cache
    async with await site.gateway.signed_in(ADMIN_KEY) as browser:
        page = await browser.get(f"/ui/conversations/{rows[0]['conversation_id']}")
    assert page.status_code == 200
    call = next(b for m in history for b in m["content"] if b["type"] == "tool_use")
    assert f'<strong>read_file</strong> <span class="muted">{call["id"]}</span>' in page.text
    assert f"result of {call['id']}" in page.text
    assert "You are a coding agent." in page.text


async def test_keys_go_where_they_should(site: Site) -> None:
    before = len(site.claude.received)
    async with httpx.AsyncClient(
        transport=site.gateway.client._transport, base_url="http://gateway.test"
    ) as raw:
        answer = await raw.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
            headers={
                "x-api-key": site.key,
                "anthropic-version": "2023-06-01",
                "anthropic-beta": "prompt-caching-2024-07-31",
            },
        )
    assert answer.status_code == 200, answer.text
    sent = dict(site.claude.received[before][2])
    assert sent[b"x-api-key"] == b"sk-ant-gateway"  # the gateway's key, never the client's
    assert b"authorization" not in sent
    assert sent[b"anthropic-version"] == b"2023-06-01"
    assert sent[b"anthropic-beta"] == b"prompt-caching-2024-07-31"


async def test_pass_through_sends_the_clients_own_key(tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if not k.endswith("_API_KEY")}
    claude = FakeUpstream()
    fakes = {"openai.test": FakeUpstream(), "claude.test": claude}
    async with gateway(tmp_path, managed=False, env=env, fakes=fakes) as running:
        answer = await running.client.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
            headers={"x-api-key": "sk-ant-client-own", "anthropic-version": "2023-06-01"},
        )
        assert answer.status_code == 200
        assert dict(claude.received[-1][2])[b"x-api-key"] == b"sk-ant-client-own"
        await running.written(1)
        (row,) = await running.history.completions()
        assert row["owner"] == row["key_fingerprint"]  # the caller is its key's fingerprint
