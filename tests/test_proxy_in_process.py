"""The proxy and capture, in process (the fast tier): what a client gets, what goes upstream,
and what is stored, for every kind of record the gateway keeps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import select

from capture.sse import iter_data
from storage.schema import completions, request_logs
from tests.in_process import UPSTREAM_KEY, Gateway, gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

WEATHER = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Gateway, str]]:
    async with gateway(tmp_path_factory.mktemp("proxy")) as running:
        _, key = await running.new_user("ann")
        yield running, key


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


async def stored(site: Gateway) -> list[Any]:
    return await site.history.rows(select(completions).order_by(completions.c.started_at))


async def recorded(site: tuple[Gateway, str], body: Any, **headers: str) -> httpx.Response:
    """``body`` sent to chat completions as the site's user; the answer, once its record is
    written."""
    running, key = site
    await running.settled()  # no earlier record still on its way
    before = running.services.writer.counters()["records_written"]
    async with running.as_user(key) as client:
        answer = await client.post("/v1/chat/completions", json=body, headers=headers)
    await running.written(before + 1)
    return answer


async def test_a_completion_is_relayed_as_the_upstream_answered_and_stored_whole(
    site: tuple[Gateway, str],
) -> None:
    running, key = site
    answer = await recorded(site, chat("你好, weather?", tools=[WEATHER]))
    assert answer.status_code == 200
    body = answer.json()
    call = body["choices"][0]["message"]["tool_calls"][0]
    # the gateway's key stayed here; the upstream got the gateway's own
    _, _, headers, _ = running.fake.received[-1]
    assert (b"authorization", f"Bearer {UPSTREAM_KEY}".encode()) in headers
    assert not any(key.encode() in value for _, value in headers)
    row = next(r for r in await stored(running) if r["response_id"] == body["id"])
    request, answered = await running.history.request_and_answer(row)
    assert request == [{"role": "user", "content": "你好, weather?"}]
    assert answered["tool_calls"] == [call]
    assert row["finish_reason"] == "tool_calls" and not row["stream"]
    assert row["total_tokens"] == body["usage"]["total_tokens"]
    assert row["client_ip"] == "198.51.100.7"
    assert orjson.loads(row["params"])["tools"] == [WEATHER]


async def test_a_stream_reaches_the_client_without_what_the_gateway_added_and_is_stored_rebuilt(
    site: tuple[Gateway, str],
) -> None:
    running, _ = site
    answer = await recorded(site, chat("stream it", stream=True))
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    # the upstream was asked for usage on the client's behalf...
    _, _, _, sent = running.fake.received[-1]
    assert orjson.loads(sent)["stream_options"] == {"include_usage": True}
    # ...and the client sees neither the usage event nor a "usage" field in any chunk
    assert b'"usage"' not in answer.content
    events = list(iter_data([answer.content]))
    assert events[-1] == b"[DONE]"
    text = "".join(
        choice["delta"].get("content") or ""
        for data in events[:-1]
        for choice in orjson.loads(data)["choices"]
    )
    row = (await stored(running))[-1]
    _, answered = await running.history.request_and_answer(row)
    assert row["stream"] and answered["content"] == text and row["finish_reason"] == "stop"
    assert row["prompt_tokens"] and row["completion_tokens"]  # the usage the client never saw


async def test_a_second_turn_lands_in_the_first_turns_conversation(
    site: tuple[Gateway, str],
) -> None:
    running, key = site
    await running.settled()  # no earlier record still on its way
    before = running.services.writer.counters()["records_written"]
    first = chat("Tell me a story")
    async with running.as_user(key) as client:
        answer = (await client.post("/v1/chat/completions", json=first)).json()
        follow = {
            **first,
            "messages": [
                *first["messages"],
                answer["choices"][0]["message"],
                {"role": "user", "content": "And then?"},
            ],
        }
        assert (await client.post("/v1/chat/completions", json=follow)).status_code == 200
    await running.written(before + 2)
    rows = (await stored(running))[-2:]
    assert rows[0]["conversation_id"] == rows[1]["conversation_id"]
    assert [r["request_message_count"] for r in rows] == [1, 3]


async def test_an_upstream_error_reaches_the_client_unchanged_and_is_stored_as_one(
    site: tuple[Gateway, str],
) -> None:
    running, _ = site
    answer = await recorded(site, chat("too many"), **{"X-Fake-Status": "429"})
    assert answer.status_code == 429 and answer.json()["error"]["message"]
    row = (await stored(running))[-1]
    assert row["status_code"] == 429 and row["error_message"] == answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, None),
        (b'{"model": "m", "messages": "hi"}', 400, None),
        (b'{"model": "m", "messages": [], "stream": "yes"}', 400, None),
    ],
)
async def test_a_malformed_request_is_refused_in_openais_shape_and_goes_nowhere(
    site: tuple[Gateway, str], body: bytes, status: int, code: str | None
) -> None:
    running, key = site
    received = len(running.fake.received)
    async with running.as_user(key) as client:
        answer = await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert answer.status_code == status
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert len(running.fake.received) == received


async def test_a_wrong_key_is_refused_before_the_upstream(site: tuple[Gateway, str]) -> None:
    running, _ = site
    received = len(running.fake.received)
    async with running.as_user("sk-not-a-gateway-key") as client:
        answer = await client.post("/v1/chat/completions", json=chat("hello"))
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    assert len(running.fake.received) == received


async def test_other_v1_routes_are_relayed_and_leave_a_request_log(
    site: tuple[Gateway, str],
) -> None:
    running, key = site
    await running.settled()  # no earlier record still on its way
    before = running.services.writer.counters()["records_written"]
    async with running.as_user(key) as client:
        models = await client.get("/v1/models?limit=2")
        moderated = await client.post("/v1/moderations", json={"input": "hi"})
    assert models.status_code == 200 and models.json()["data"]
    assert moderated.status_code == 404  # the fake upstream has no such route
    await running.written(before + 2)
    logs = await running.history.rows(select(request_logs).order_by(request_logs.c.started_at))
    assert [(r["method"], r["path"], r["status_code"]) for r in logs[-2:]] == [
        ("GET", "/v1/models", 200),
        ("POST", "/v1/moderations", 404),
    ]
    assert logs[-1]["bytes_out"] == len(moderated.content)


async def test_the_gateways_own_routes_answer_in_each_surfaces_shape(
    site: tuple[Gateway, str],
) -> None:
    running, _ = site
    client = running.client
    for method in ("GET", "POST", "PUT"):  # a base URL without /v1, say: whatever the method
        unknown = await client.request(method, "/chat/completions")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_method = await client.put("/admin/users")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"]
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    admin = await client.get("/admin/users")
    assert admin.status_code == 401 and admin.json()["error"]["code"] == "invalid_api_key"
    viewer = await client.get("/ui")
    assert viewer.status_code == 307 and viewer.headers["location"] == "/ui/"
    page = await client.get("/ui/nothing-here")
    assert page.status_code == 404 and "<h1>Not found</h1>" in page.text
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and "writer_stalled_seconds" in ready.json()
    metrics = (await client.get("/metrics")).text
    assert "mes_records_written_total" in metrics and "mes_writer_stalled_seconds" in metrics


def _series(metrics: str, name: str) -> dict[str, float]:
    """Each line of ``name`` in Prometheus' text: its labels (as written) to its value."""
    found = {}
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name) :].rpartition(" ")
            found[labels] = float(value)
    return found


async def test_metrics_time_requests_by_route_and_status_the_writers_batches_and_the_pool(
    site: tuple[Gateway, str],
) -> None:
    running, key = site
    before = (await running.client.get("/metrics")).text
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "timed"}]}
    for _ in range(3):
        await recorded(site, body)
    failing = await running.client.post(
        "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", "X-Fake-Status": "503"},
    )
    assert failing.status_code == 503
    after = (await running.client.get("/metrics")).text
    name = "mes_request_duration_seconds"
    ok = '{route="/v1/chat/completions",status="200"}'
    count = _series(after, name + "_count")
    assert count[ok] - _series(before, name + "_count").get(ok, 0) == 3
    assert count['{route="/v1/chat/completions",status="503"}'] >= 1
    buckets = _series(after, name + "_bucket")
    inf = buckets['{route="/v1/chat/completions",status="200",le="+Inf"}']
    assert inf == count[ok] and _series(after, name + "_sum")[ok] > 0
    ordered = [v for k, v in buckets.items() if k.startswith(ok[:-1])]
    assert ordered == sorted(ordered)  # cumulative
    batches = _series(after, "mes_writer_batch_seconds_count")
    assert batches[""] >= 1
    assert _series(after, 'mes_writer_batch_seconds_bucket{le="+Inf"}')[""] == batches[""]
    pool = _series(after, "mes_db_pool_connections")
    assert set(pool) == {
        f'{{database="main",state="{state}"}}' for state in ("in_use", "idle", "waiting")
    }
