"""1,000 mixed requests at concurrency 32 leave exactly 1,000 right records, on every backend."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

TOTAL = 1000
CONCURRENCY = 32
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


@dataclass
class Case:
    """One request of the mix and what the client saw of it."""

    index: int
    kind: str  # plain, stream, stream_usage_tools, tools, error, disconnect
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    expected: dict[str, Any] = field(default_factory=dict)  # upstream's own answer
    seen_content: str = ""


def make_case(index: int) -> Case:
    kind = ["plain", "stream", "stream_usage_tools", "tools", "error", "disconnect"][index % 6]
    body: dict[str, Any] = {
        "model": "gpt-4o-mini" if index % 2 else "o3-mini",
        "user": f"user-{index}",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Request {index}: 你好, こんにちは 🙂"},
        ],
    }
    headers: dict[str, str] = {}
    if kind in ("stream", "stream_usage_tools", "disconnect"):
        body["stream"] = True
    if kind == "stream_usage_tools":
        body["stream_options"] = {"include_usage": True}
    if kind in ("stream_usage_tools", "tools"):
        body["tools"] = TOOLS
    if kind == "error":
        headers["X-Fake-Status"] = "429" if index % 4 else "500"
    if kind == "disconnect":
        headers.update({"X-Fake-Chunks": "40", "X-Fake-Chunk-Delay": "0.02"})
    return Case(index, kind, body, headers)


async def send(client: httpx.AsyncClient, case: Case) -> None:
    if case.kind == "disconnect":
        async with client.stream(
            "POST", "/chat/completions", json=case.body, headers=case.headers
        ) as response:
            case.status = response.status_code
            events = 0
            async for line in response.aiter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    break  # leaving the block closes the connection mid-stream
        return
    response = await client.post("/chat/completions", json=case.body, headers=case.headers)
    case.status = response.status_code


async def expected_answer(upstream: httpx.AsyncClient, case: Case) -> dict[str, Any]:
    """What the upstream answers the same request, non-streamed: the oracle for the record."""
    body = {k: v for k, v in case.body.items() if k not in ("stream", "stream_options")}
    response = await upstream.post("/chat/completions", json=body, headers=case.headers)
    answer: dict[str, Any] = response.json()
    answer["_status"] = response.status_code
    return answer


async def run_mix(base_url: str, upstream_url: str) -> list[Case]:
    cases = [make_case(index) for index in range(TOTAL)]
    limits = httpx.Limits(max_connections=CONCURRENCY)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=60, headers={"Authorization": "Bearer sk-load"}
    ) as client:

        async def one(case: Case) -> None:
            async with semaphore:
                await send(client, case)

        await asyncio.wait_for(asyncio.gather(*(one(case) for case in cases)), timeout=240)
    async with httpx.AsyncClient(base_url=upstream_url, limits=limits, timeout=60) as upstream:

        async def oracle(case: Case) -> None:
            async with semaphore:
                case.expected = await expected_answer(upstream, case)

        await asyncio.gather(*(oracle(case) for case in cases))
    return cases


def check_record(case: Case, row: Any, answer: dict[str, Any] | None) -> None:
    expected = case.expected
    assert row["client_ip"] == "127.0.0.1"
    assert row["stream"] is bool(case.body.get("stream"))
    assert row["requested_model"] == case.body["model"]
    if case.kind == "error":
        assert case.status == expected["_status"] == row["status_code"]
        assert row["error_type"] == expected["error"]["type"]
        assert row["error_message"] == expected["error"]["message"]
        assert answer is None
        return
    assert case.status == 200 == row["status_code"]
    choice = expected["choices"][0]
    assert answer is not None
    if case.kind == "disconnect":
        assert row["finish_reason"] == "client_disconnected"
        assert row["error_type"] == "client_disconnected"
        assert choice["message"]["content"].startswith(answer["content"] or "")
        assert row["total_tokens"] is None
        return
    assert row["finish_reason"] == choice["finish_reason"]
    assert answer["content"] == choice["message"]["content"]
    assert answer.get("tool_calls") == choice["message"].get("tool_calls")
    usage = expected["usage"]
    assert row["prompt_tokens"] == usage["prompt_tokens"]
    assert row["completion_tokens"] == usage["completion_tokens"]
    assert row["total_tokens"] == usage["total_tokens"]
    assert row["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert row["reasoning_tokens"] == usage["completion_tokens_details"]["reasoning_tokens"]
    assert orjson.loads(row["usage"]) == usage
    assert row["response_id"] == expected["id"]
    assert row["response_model"] == expected["model"]


async def test_a_thousand_mixed_requests_leave_exactly_a_thousand_right_records(
    upstream: Any, history_dsn: str, history: HistoryDB, tmp_path: Path
) -> None:
    env = {"UPSTREAM_BASE_URL": upstream.base_url, "SQL_DSN": history_dsn}
    with GatewayProcess(env, tmp_path) as gateway:
        cases = await run_mix(gateway.base_url, upstream.base_url)
        assert await history.wait_for("completions", TOTAL) == TOTAL
        metrics = httpx.get(gateway.url + "/metrics").text
    assert "mes_records_dropped_total 0" in metrics
    assert "mes_records_failed_total 0" in metrics
    rows = {row["end_user"]: row for row in await history.completions()}
    assert len(rows) == TOTAL
    for case in cases:
        row = rows[case.body["user"]]
        request, answer = await history.request_and_answer(row)
        assert request == case.body["messages"]
        check_record(case, row, answer)
