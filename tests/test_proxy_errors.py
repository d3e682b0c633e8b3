"""Bad input, upstream failures and keys: each gets the documented answer, the gateway keeps
serving, and no key ends up where it must not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_process import GatewayProcess, free_port
from tests.history_db import HistoryDB

UPSTREAM_KEY = "sk-upstream-NEVER-SHOWN-5f1c"
GATEWAY_KEY = "gw-alpha-NEVER-UPSTREAM-77aa"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def upstream_root(upstream: Any) -> str:
    return str(upstream.base_url).removesuffix("/v1")


def upstream_requests(upstream: Any) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = httpx.get(upstream_root(upstream) + "/_fake/requests").json()
    return received


def clear_upstream(upstream: Any) -> None:
    httpx.delete(upstream_root(upstream) + "/_fake/requests")


@pytest.fixture(scope="module")
def managed(upstream: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "UPSTREAM_API_KEY": UPSTREAM_KEY,
        "GATEWAY_KEYS": f"{GATEWAY_KEY},gw-beta-key",
        "GATEWAY_MAX_BODY_BYTES": "20000",
        "UPSTREAM_TIMEOUT": "3",
        "LOG_LEVEL": "debug",
    }
    with GatewayProcess(env, tmp_path_factory.mktemp("managed")) as process:
        yield process


def post(
    gateway: GatewayProcess,
    body: bytes | dict[str, Any],
    key: str | None = GATEWAY_KEY,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    if isinstance(body, dict):
        return httpx.post(
            gateway.base_url + "/chat/completions", json=body, headers=all_headers, timeout=30
        )
    all_headers["Content-Type"] = "application/json"
    return httpx.post(
        gateway.base_url + "/chat/completions", content=body, headers=all_headers, timeout=30
    )


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "x", "messages": [', None),
        (b"\xff\xfe not utf-8", None),
        (b"[1, 2, 3]", None),
        (b'{"model": "x", "messages": "hello"}', "messages"),
        (b'{"model": "x", "messages": [], "stream": "yes"}', "stream"),
        (b'{"model": "x", "messages": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", None),
    ],
    ids=[
        "truncated",
        "not-utf8",
        "not-an-object",
        "messages-a-string",
        "stream-a-string",
        "nested-5000-deep",
    ],
)
def test_malformed_requests_get_a_400_and_never_reach_the_upstream(
    managed: GatewayProcess, upstream: Any, body: bytes, param: str | None
) -> None:
    clear_upstream(upstream)
    error = assert_openai_error(post(managed, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert upstream_requests(upstream) == []


def test_a_body_over_the_limit_gets_a_413_before_anything_goes_upstream(
    managed: GatewayProcess, upstream: Any
) -> None:
    clear_upstream(upstream)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 30000}]}
    assert_openai_error(post(managed, big), 413)
    assert upstream_requests(upstream) == []
    assert post(managed, CHAT).status_code == 200


@pytest.mark.parametrize("key", [None, "gw-wrong", UPSTREAM_KEY])
def test_a_missing_or_unknown_gateway_key_gets_a_401(
    managed: GatewayProcess, upstream: Any, key: str | None
) -> None:
    clear_upstream(upstream)
    error = assert_openai_error(post(managed, CHAT, key=key), 401)
    assert error["code"] == "invalid_api_key"
    assert upstream_requests(upstream) == []


def test_managed_mode_swaps_the_gateway_key_for_the_upstream_key(
    managed: GatewayProcess, upstream: Any
) -> None:
    clear_upstream(upstream)
    response = post(managed, CHAT, headers={"api-key": GATEWAY_KEY})
    assert response.status_code == 200
    assert UPSTREAM_KEY not in response.text
    assert all(UPSTREAM_KEY not in value for value in response.headers.values())
    (received,) = upstream_requests(upstream)
    assert received["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "api-key" not in received["headers"]
    assert GATEWAY_KEY not in repr(received)


def test_hop_by_hop_headers_are_not_forwarded(managed: GatewayProcess, upstream: Any) -> None:
    clear_upstream(upstream)
    response = post(
        managed,
        CHAT,
        headers={
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "1",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "X-Custom": "kept",
        },
    )
    assert response.status_code == 200
    (received,) = upstream_requests(upstream)
    headers = received["headers"]
    assert headers["x-custom"] == "kept"
    for name in ("x-private-hop", "te", "proxy-authorization", "keep-alive"):
        assert name not in headers
    assert (
        "transfer-encoding" not in response.headers
        or response.headers.get("content-length") is None
    )


def test_upstream_errors_reach_the_client_unchanged(managed: GatewayProcess, upstream: Any) -> None:
    for status in ("400", "429", "500", "503"):
        direct = httpx.post(
            upstream.base_url + "/chat/completions", json=CHAT, headers={"X-Fake-Status": status}
        )
        proxied = post(managed, CHAT, headers={"X-Fake-Status": status})
        assert (proxied.status_code, proxied.content) == (direct.status_code, direct.content)


def test_an_upstream_that_does_not_answer_in_time_gets_a_504(managed: GatewayProcess) -> None:
    error = assert_openai_error(post(managed, CHAT, headers={"X-Fake-Hang": "8"}), 504)
    assert error["code"] == "upstream_timeout"
    assert post(managed, CHAT).status_code == 200


@pytest.mark.slow  # a gateway process
def test_an_unreachable_upstream_gets_a_502_and_is_recorded(tmp_path: Path) -> None:
    env = {"UPSTREAM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}
    with GatewayProcess(env, tmp_path) as gateway:
        error = assert_openai_error(post(gateway, CHAT, key="sk-x"), 502)
        assert error["code"] == "upstream_unreachable"
        assert httpx.get(gateway.url + "/healthz").status_code == 200


def test_a_stream_the_upstream_breaks_ends_cleanly_with_an_error_event(
    managed: GatewayProcess,
) -> None:
    client = openai.OpenAI(base_url=managed.base_url, api_key=GATEWAY_KEY, max_retries=0)
    received = []
    with pytest.raises(openai.APIError, match="upstream connection was lost"):
        for chunk in client.chat.completions.create(
            **CHAT, stream=True, extra_headers={"X-Fake-Reset-After": "3"}
        ):
            received.append(chunk)
    assert received  # the part that arrived was passed on


async def test_no_key_reaches_the_logs_or_the_database_and_errors_are_recorded(
    managed: GatewayProcess, upstream: Any
) -> None:
    post(managed, CHAT)
    post(managed, CHAT, headers={"X-Fake-Status": "429"})
    post(managed, CHAT, headers={"X-Fake-Hang": "8"})
    post(managed, {**CHAT, "stream": True}, headers={"X-Fake-Reset-After": "2"})
    db = HistoryDB(str(managed.workdir / "mes_gateway.db"))
    try:
        await db.wait_for("completions", 4)
        rows = await db.completions()
        by_error = {row["error_type"]: row for row in rows}
        assert any(row["status_code"] == 429 and row["error_type"] for row in rows)
        assert by_error["upstream_timeout"]["status_code"] == 504
        broken = by_error["upstream_disconnected"]
        assert broken["finish_reason"] == "upstream_disconnected"
        stored = await db.all_text()
    finally:
        await db.close()
    assert UPSTREAM_KEY not in stored and GATEWAY_KEY not in stored
    assert UPSTREAM_KEY not in managed.log() and GATEWAY_KEY not in managed.log()


def test_forwarded_for_is_honoured_only_from_trusted_proxies(upstream: Any, tmp_path: Path) -> None:
    env = {"UPSTREAM_BASE_URL": upstream.base_url, "TRUSTED_PROXIES": "127.0.0.0/8"}
    with GatewayProcess(env, tmp_path / "trusted") as gateway:
        post(
            gateway,
            {**CHAT, "user": "behind-proxy"},
            key="sk-x",
            headers={"X-Forwarded-For": "203.0.113.50, 127.0.0.2"},
        )
    with GatewayProcess({"UPSTREAM_BASE_URL": upstream.base_url}, tmp_path / "direct") as gateway:
        post(
            gateway,
            {**CHAT, "user": "spoofer"},
            key="sk-x",
            headers={"X-Forwarded-For": "203.0.113.50"},
        )

    async def ips(folder: str) -> list[str]:
        db = HistoryDB(str(tmp_path / folder / "mes_gateway.db"))
        try:
            await db.wait_for("completions", 1)
            return [row["client_ip"] for row in await db.completions()]
        finally:
            await db.close()

    assert asyncio.run(ips("trusted")) == ["203.0.113.50"]
    assert asyncio.run(ips("direct")) == ["127.0.0.1"]
