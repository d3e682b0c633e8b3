"""One gateway process in front of three upstreams on loopback (the slow tier), on every
backend: an OpenAI-format one, an Anthropic-format one, and one that answers 503 with the
OpenAI one as its fallback. The anthropic SDK (sync, async, ``messages.stream``) and the
openai SDK get what they would get directly, byte for byte and event for event; each record
names the upstream that answered and its attempts, with its tokens and its cost as
genai-prices computes it (none for a model it does not know)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from genai_prices import Usage, calc_price

from fake_upstream.testing import Served, serve
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

pytestmark = pytest.mark.slow

CLAUDE = "claude-sonnet-4-5"
ASKED: dict[str, Any] = {
    "model": CLAUDE,
    "max_tokens": 300,
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "name a river"}],
}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Served]]:
    with ExitStack() as stack:
        yield {
            "openai": stack.enter_context(serve()),
            "claude": stack.enter_context(serve()),
            "busy": stack.enter_context(serve(behaviour={"X-Fake-Status": "503"})),
        }


def _env(upstreams: dict[str, Served], history_dsn: str) -> dict[str, str]:
    return {
        "UPSTREAMS": "busy,openai,claude",
        "UPSTREAM_BUSY_BASE_URL": upstreams["busy"].base_url,
        "UPSTREAM_BUSY_MODELS": "gpt-4o*",
        "UPSTREAM_BUSY_FALLBACKS": "openai",
        "UPSTREAM_OPENAI_BASE_URL": upstreams["openai"].base_url,
        "UPSTREAM_OPENAI_MODELS": "gpt-*,o*,local-*",
        "UPSTREAM_OPENAI_PROVIDER": "openai",
        "UPSTREAM_CLAUDE_BASE_URL": upstreams["claude"].base_url,
        "UPSTREAM_CLAUDE_MODELS": "claude-*",
        "UPSTREAM_CLAUDE_FORMAT": "anthropic",
        "UPSTREAM_CLAUDE_PROVIDER": "anthropic",
        "SQL_DSN": history_dsn,
    }


def _own_price(row: dict[str, Any], provider: str) -> float:
    price = calc_price(
        Usage(
            input_tokens=row["prompt_tokens"],
            output_tokens=row["completion_tokens"],
            cache_read_tokens=row["cached_tokens"] or 0,
            cache_write_tokens=row["cache_write_tokens"] or 0,
        ),
        row["response_model"],
        provider_id=provider,
        genai_request_timestamp=row["started_at"].replace(tzinfo=UTC),
    )
    return float(price.total_price)


async def test_three_upstreams_answer_as_directly_and_every_record_says_which(
    upstreams: dict[str, Served], history_dsn: str, tmp_path: Path
) -> None:
    with GatewayProcess(_env(upstreams, history_dsn), tmp_path) as gateway:
        through = anthropic.Anthropic(base_url=gateway.url, api_key="sk-ant-own", max_retries=0)
        direct = anthropic.Anthropic(
            base_url=upstreams["claude"].root, api_key="sk-ant-own", max_retries=0
        )
        whole = through.messages.with_raw_response.create(**ASKED)
        assert whole.http_response.content == (
            direct.messages.with_raw_response.create(**ASKED).http_response.content
        )
        with through.messages.stream(**ASKED) as stream:
            events = [event.model_dump() for event in stream]
        with direct.messages.stream(**ASKED) as stream:
            assert events == [event.model_dump() for event in stream]
        async_through = anthropic.AsyncAnthropic(
            base_url=gateway.url, api_key="sk-ant-own", max_retries=0
        )
        answer = await async_through.messages.create(**ASKED)
        assert answer.content == direct.messages.create(**ASKED).content

        chat = openai.OpenAI(base_url=gateway.base_url, api_key="sk-own", max_retries=0)
        chat_direct = openai.OpenAI(
            base_url=upstreams["openai"].base_url, api_key="sk-own", max_retries=0
        )
        question: dict[str, Any] = {"messages": [{"role": "user", "content": "hello"}]}
        for model in ("gpt-4o", "local-model"):
            got = chat.chat.completions.create(model=model, **question)
            assert got == chat_direct.chat.completions.create(model=model, **question)

        history = HistoryDB(history_dsn)
        try:
            await history.wait_for("completions", 5)
            rows = sorted(
                (dict(row) for row in await history.completions()),
                key=lambda row: row["started_at"],
            )
        finally:
            await history.close()
    messages, chats = rows[:3], rows[3:]
    for row in messages:
        assert row["call_type"] == "messages"
        assert row["upstream"] == "claude"
        assert row["attempts"] is None  # one try: no list stored
        assert row["cache_write_tokens"] and row["prompt_tokens"] > row["cache_write_tokens"]
        assert row["cost_usd"] == pytest.approx(_own_price(row, "anthropic"), rel=1e-3)
    gpt, local = chats
    assert gpt["upstream"] == "openai"
    assert [(a["upstream"], a["status"]) for a in orjson.loads(gpt["attempts"])] == [
        ("busy", 503),
        ("openai", 200),
    ]
    assert gpt["cost_usd"] == pytest.approx(_own_price(gpt, "openai"), rel=1e-3)
    assert local["upstream"] == "openai"
    assert local["cost_usd"] is None  # a model genai-prices does not know: unpriced, not 0
    assert local["price_version"] is None
