"""Failover between real upstreams on loopback (the slow tier), through the gateway's own
connection pool, on every backend: an upstream that refuses, one that answers 503, one that
stalls before its head, each passed over before the client sees a byte; a stream that breaks
after its first byte is not retried, and its record says so."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from fake_upstream.testing import Served, free_port, serve
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Served]]:
    """A good upstream, and one for each way of failing before the answer begins."""
    with ExitStack() as stack:
        yield {
            "good": stack.enter_context(serve(models=["gpt-4o", "gpt-4o-mini"])),
            "busy": stack.enter_context(serve(behaviour={"X-Fake-Status": "503"})),
            "stalled": stack.enter_context(serve(behaviour={"X-Fake-Hang": "30"})),
            "breaking": stack.enter_context(
                serve(behaviour={"X-Fake-Reset-After": "2"}, models=["flaky-1"])
            ),
        }


def _env(upstreams: dict[str, Served], history_dsn: str) -> dict[str, str]:
    refused = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    return {
        "UPSTREAMS": "refused,busy,stalled,good,breaking",
        "UPSTREAM_REFUSED_BASE_URL": refused,
        "UPSTREAM_REFUSED_MODELS": "gpt-4o",
        "UPSTREAM_REFUSED_FALLBACKS": "busy",
        "UPSTREAM_BUSY_BASE_URL": upstreams["busy"].base_url,
        "UPSTREAM_BUSY_MODELS": "busy-*",
        "UPSTREAM_BUSY_FALLBACKS": "stalled",
        "UPSTREAM_STALLED_BASE_URL": upstreams["stalled"].base_url,
        "UPSTREAM_STALLED_MODELS": "stalled-*",
        "UPSTREAM_STALLED_FALLBACKS": "good",
        "UPSTREAM_GOOD_BASE_URL": upstreams["good"].base_url,
        "UPSTREAM_GOOD_MODELS": "good-*",
        "UPSTREAM_BREAKING_BASE_URL": upstreams["breaking"].base_url,
        "UPSTREAM_BREAKING_MODELS": "flaky-*",
        "UPSTREAM_BREAKING_FALLBACKS": "good",
        "UPSTREAM_TIMEOUT": "1",  # the stalled one's head is late after a second
        "SQL_DSN": history_dsn,
    }


async def test_refused_busy_and_stalled_upstreams_are_passed_over_before_the_first_byte(
    upstreams: dict[str, Served], history_dsn: str, tmp_path: Path
) -> None:
    with GatewayProcess(_env(upstreams, history_dsn), tmp_path) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-client", max_retries=0)
        direct = openai.OpenAI(
            base_url=upstreams["good"].base_url, api_key="sk-client", max_retries=0
        )
        asked: dict[str, Any] = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "hello"}],
            "seed": 1,
        }
        whole = client.chat.completions.with_raw_response.create(**asked)
        streamed = [
            chunk.model_dump() for chunk in client.chat.completions.create(**asked, stream=True)
        ]
        assert whole.http_response.status_code == 200
        reference = direct.chat.completions.create(**asked)
        assert whole.parse().choices[0].message == reference.choices[0].message
        assert streamed == [
            chunk.model_dump() for chunk in direct.chat.completions.create(**asked, stream=True)
        ]
        listed = [model.id for model in client.models.list()]  # the others fail, or stall
        assert listed == ["gpt-4o", "gpt-4o-mini", "flaky-1"]
        history = HistoryDB(history_dsn)
        try:
            await history.wait_for("completions", 2)
            rows = await history.completions()
        finally:
            await history.close()
    assert len(rows) == 2
    for row in rows:
        attempts = orjson.loads(row["attempts"])
        assert row["upstream"] == "good"
        assert row["status_code"] == 200
        assert [(a["upstream"], a.get("status"), a.get("error")) for a in attempts] == [
            ("refused", None, "upstream_unreachable"),
            ("busy", 503, None),
            ("stalled", None, "upstream_timeout"),
            ("good", 200, None),
        ]
        assert all(attempt["ms"] > 0 for attempt in attempts)


async def test_a_stream_broken_after_its_first_byte_is_not_retried(
    upstreams: dict[str, Served], history_dsn: str, tmp_path: Path
) -> None:
    with GatewayProcess(_env(upstreams, history_dsn), tmp_path) as gateway:
        body = {"model": "flaky-1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body) as answer:
            assert answer.status_code == 200
            received = b"".join(answer.iter_bytes())
        assert b"upstream_disconnected" in received  # the client sees the break
        assert b"[DONE]" not in received
        history = HistoryDB(history_dsn)
        try:
            await history.wait_for("completions", 1)
            (row,) = await history.completions()
        finally:
            await history.close()
    assert row["upstream"] == "breaking"
    assert row["finish_reason"] == "upstream_disconnected"
    assert row["attempts"] is None  # one try, never a second
    to_good = httpx.get(upstreams["good"].root + "/_fake/requests").json()
    assert not [r for r in to_good if "flaky-1" in r["body"]]  # never sent on
