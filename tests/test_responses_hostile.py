"""Hostile input to the Responses API, in process (the fast tier): ten thousand items, items
nested deep, item types never seen, bytes that are not UTF-8, a stream cut into one-byte
network reads. Each gets an OpenAI-shaped 4xx, or a record stored as sent: never a crash,
never a lost record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import func, select

from storage.schema import completions, messages
from tests.in_process import ADMIN_KEY, Gateway, gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Gateway, str]]:
    async with gateway(tmp_path_factory.mktemp("hostile")) as running:
        _, key = await running.new_user("mallory")
        yield running, key


async def _written(running: Gateway, before: int) -> None:
    await running.written(before + 1)


async def test_ten_thousand_items_are_stored_each_once_and_rebuilt(
    site: tuple[Gateway, str],
) -> None:
    running, key = site
    items = [{"role": "user", "content": f"line {n}"} for n in range(10_000)]
    await running.settled()  # no earlier record still on its way
    before = running.services.writer.counters()["records_written"]
    async with running.as_user(key) as client:
        answer = await client.post("/v1/responses", json={"model": "m", "input": items})
    assert answer.status_code == 200
    await _written(running, before)
    detail = (
        await running.client.get(f"/admin/completions/{answer.json()['id']}", headers=ADMIN)
    ).json()
    assert detail["request"] == items and detail["request_message_count"] == 10_000
    stored = await running.history.rows(
        select(func.count().label("n"))
        .select_from(messages)
        .where(messages.c.conversation_id == detail["conversation_id"])
    )
    assert stored[0]["n"] == 10_000 + len(answer.json()["output"])


async def test_unseen_item_types_and_deep_items_are_kept_as_json(
    site: tuple[Gateway, str],
) -> None:
    running, key = site
    deep: Any = "bottom"
    for _ in range(120):  # 240 levels: as deep as the gateway takes
        deep = {"inner": [deep]}
    odd = [
        {"type": "hologram_call", "id": "hg_1", "payload": deep},
        {"type": "message", "role": "user", "content": [{"type": "input_smell", "smell": "rain"}]},
        ["a", "list", "as", "an", "item"],
        None,
    ]
    await running.settled()  # no earlier record still on its way
    before = running.services.writer.counters()["records_written"]
    async with running.as_user(key) as client:
        answer = await client.post("/v1/responses", json={"model": "m", "input": odd})
    assert answer.status_code == 400  # the upstream's answer, relayed: the record keeps it
    await _written(running, before)
    (record,) = await running.history.rows(
        select(completions.c.id).order_by(completions.c.started_at.desc()).limit(1)
    )
    detail = (await running.client.get(f"/admin/completions/{record['id']}", headers=ADMIN)).json()
    assert detail["request"] == odd
    assert detail["status_code"] == 400
    assert detail["error_message"] == answer.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "input": "\xff\xfe not UTF-8"}',
        b'{"model": "m", "input": ' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"model": "m", "input": 7}',
        b"[1, 2, 3]",
        b'{"model": "m", "input": "x", "stream": "yes"}',
    ],
    ids=["not-utf8", "nested-300-deep", "input-a-number", "not-an-object", "stream-a-string"],
)
async def test_a_body_that_cannot_be_recorded_is_refused_in_openais_shape(
    site: tuple[Gateway, str], body: bytes
) -> None:
    running, key = site
    sent = len(running.fake.received)
    async with running.as_user(key) as client:
        answer = await client.post(
            "/v1/responses", content=body, headers={"content-type": "application/json"}
        )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert len(running.fake.received) == sent  # nothing went upstream


async def test_a_stream_cut_into_one_byte_reads_reaches_the_client_and_the_record_whole(
    site: tuple[Gateway, str],
) -> None:
    running, key = site
    body = {"model": "m", "input": "split me", "stream": True, "tools": []}
    await running.settled()  # no earlier record still on its way
    before = running.services.writer.counters()["records_written"]
    async with running.as_user(key) as client:
        whole = await client.post("/v1/responses", json=body)
        split = await client.post("/v1/responses", json=body, headers={"X-Fake-Split-Bytes": "1"})
    assert whole.status_code == split.status_code == 200

    def events(answer: httpx.Response) -> list[Any]:
        datas = [line[6:] for line in answer.text.split("\n") if line.startswith("data: ")]
        return [orjson.loads(data)["type"] for data in datas]

    assert events(split) == events(whole) and events(split)[-1] == "response.completed"
    assert "[DONE]" not in split.text and split.text.count("event: ") == len(events(split))
    final = orjson.loads(split.text.rsplit("data: ", 1)[1])["response"]
    await running.written(before + 2)
    found = await running.client.get(f"/admin/completions/{final['id']}", headers=ADMIN)
    detail = found.json()
    assert detail["finish_reason"] == "stop" and detail["answer"] == final["output"]
    assert detail["ttft_ms"] is not None
    records = await running.history.rows(
        select(completions.c.id).where(completions.c.response_id == final["id"])
    )
    assert len(records) == 1
