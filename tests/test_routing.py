"""Several upstreams, in process (the fast tier): start-up refuses what cannot route, a
request goes by its model to the first upstream whose patterns match, falls over to the next
before its answer begins, and each record names the upstream that answered and every try."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from fake_upstream.app import FakeUpstream
from fake_upstream.responses import error as fake_error
from gateway.routing import ANTHROPIC, OPENAI, Router
from gateway.settings import ConfigError, Settings
from gateway.upstream import Upstream
from tests.in_process import ADMIN_KEY, Gateway, gateway

BASE = {
    "UPSTREAMS": "openai,azure,local,claude",
    "UPSTREAM_OPENAI_BASE_URL": "http://openai.test/v1",
    "UPSTREAM_OPENAI_API_KEY": "sk-openai",
    "UPSTREAM_OPENAI_MODELS": "gpt-*,o3*",
    "UPSTREAM_OPENAI_FALLBACKS": "azure",
    "UPSTREAM_AZURE_BASE_URL": "http://azure.test/v1",
    "UPSTREAM_AZURE_API_KEY": "sk-azure",
    "UPSTREAM_AZURE_MODELS": "gpt-4o",
    "UPSTREAM_AZURE_FALLBACKS": "local",
    "UPSTREAM_LOCAL_BASE_URL": "http://local.test/v1",
    "UPSTREAM_LOCAL_MODELS": "llama*,qwen*",
    "UPSTREAM_CLAUDE_BASE_URL": "http://claude.test/v1",
    "UPSTREAM_CLAUDE_API_KEY": "sk-ant-gateway",
    "UPSTREAM_CLAUDE_MODELS": "claude-*",
    "UPSTREAM_CLAUDE_FORMAT": "anthropic",
    "GATEWAY_KEYS": "gw-key",
}


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"UPSTREAM_LOCAL_BASE_URL": ""}, "UPSTREAM_LOCAL_BASE_URL is not set"),
        ({"UPSTREAM_AZURE_FALLBACKS": "backup"}, "UPSTREAM_AZURE_FALLBACKS names 'backup'"),
        ({"UPSTREAM_LOCAL_FALLBACKS": "openai"}, "UPSTREAM_LOCAL_FALLBACKS leads back"),
        ({"UPSTREAM_LOCAL_FALLBACKS": "local"}, "UPSTREAM_LOCAL_FALLBACKS leads back"),
        ({"UPSTREAM_LOCAL_MODELS": " , "}, "UPSTREAM_LOCAL_MODELS must list"),
        ({"UPSTREAM_LOCAL_FALLBACKS": "claude"}, "whose format is anthropic"),
        ({"UPSTREAM_CLAUDE_FORMAT": "gemini"}, "UPSTREAM_CLAUDE_FORMAT must be one of"),
        ({"UPSTREAMS": "openai,openai"}, "UPSTREAMS must not name an upstream twice"),
        ({"GATEWAY_KEYS": ""}, "an UPSTREAM_<NAME>_API_KEY is set (managed mode)"),
    ],
)
def test_start_up_refuses_what_cannot_route_naming_the_variable(
    changed: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env({**BASE, **changed})


def test_a_request_goes_by_model_to_the_first_match_then_its_fallbacks() -> None:
    settings = Settings.from_env(BASE)
    assert settings.managed_mode
    router = Router(
        [
            Upstream(s.base_url, s.api_key, None, s.name, s.format, s.models, s.fallbacks)  # type: ignore[arg-type]
            for s in settings.upstreams
        ]
    )

    def names(format: str, model: str | None) -> list[str]:
        return [upstream.name for upstream in router.chain(format, model)]

    assert names(OPENAI, "gpt-4o") == ["openai", "azure", "local"]
    assert names(OPENAI, "o3-mini") == ["openai", "azure", "local"]
    assert names(OPENAI, "qwen3") == ["local"]
    assert names(OPENAI, "claude-sonnet-4-5") == []  # an OpenAI route never reaches Anthropic
    assert names(ANTHROPIC, "claude-sonnet-4-5") == ["claude"]
    assert names(ANTHROPIC, "gpt-4o") == []
    assert names(OPENAI, None) == ["openai", "azure", "local"]  # no model: the first
    assert names(OPENAI, "GPT-4O") == []  # patterns match case and all


def _fakes(**behaviours: dict[str, str]) -> dict[str, FakeUpstream]:
    """A fake for each OpenAI-format upstream of BASE, each acting on its ``behaviours``."""
    return {
        f"{name}.test": FakeUpstream(behaviour=behaviours.get(name))
        for name in ("openai", "azure", "local")
    }


def _client(site: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://gateway.test/v1",
        api_key="gw-key",
        http_client=site.as_user("gw-key"),
        max_retries=0,
    )


async def _records(site: Gateway, count: int) -> list[dict[str, Any]]:
    await site.written(count)
    rows = await site.history.completions()
    return [
        {**row, "attempts": orjson.loads(row["attempts"]) if row["attempts"] else None}
        for row in rows
    ]


async def test_each_model_reaches_its_upstream_with_that_upstreams_key(tmp_path: Path) -> None:
    fakes = _fakes()
    async with gateway(tmp_path, env=BASE, fakes=fakes) as site:
        for model in ("gpt-4o", "llama3"):
            answer = await site.client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer gw-key"},
            )
            assert answer.status_code == 200, answer.text
        openai_fake, local_fake = fakes["openai.test"], fakes["local.test"]
        sent_openai = dict(openai_fake.received[-1][2])
        sent_local = dict(local_fake.received[-1][2])
        assert sent_openai[b"authorization"] == b"Bearer sk-openai"
        assert b"authorization" not in sent_local  # no key of its own: the gateway key stays
        assert orjson.loads(local_fake.received[-1][3])["model"] == "llama3"
        rows = await _records(site, 2)
        by_model = {row["requested_model"]: row for row in rows}
        assert by_model["gpt-4o"]["upstream"] == "openai"
        assert by_model["llama3"]["upstream"] == "local"
        assert by_model["gpt-4o"]["attempts"] is None  # one try: no list stored
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        one = await site.client.get(f"/admin/completions/{by_model['gpt-4o']['id']}", headers=admin)
        assert one.json()["upstream"] == "openai"
        assert one.json()["attempts"] == [
            {"upstream": "openai", "status": 200, "error": None, "ms": None}
        ]


@pytest.mark.parametrize("status", ["503", "429", "500"])
async def test_a_failing_upstream_falls_over_before_the_first_byte(
    tmp_path: Path, status: str
) -> None:
    fakes = _fakes(openai={"X-Fake-Status": status})
    async with gateway(tmp_path, env=BASE, fakes=fakes) as site:
        client = _client(site)
        answer = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}]
        )
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "again"}], stream=True
            )
        ]
        assert answer.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop"
        rows = await _records(site, 2)
        for row in rows:
            assert row["upstream"] == "azure"
            assert row["status_code"] == 200
            assert [(a["upstream"], a.get("status")) for a in row["attempts"]] == [
                ("openai", int(status)),
                ("azure", 200),
            ]
            assert all(a["ms"] >= 0 for a in row["attempts"])


async def test_every_upstream_failing_gives_the_last_answer(tmp_path: Path) -> None:
    failing = {"X-Fake-Status": "503"}
    fakes = _fakes(openai=failing, azure=failing, local=failing)
    async with gateway(tmp_path, env=BASE, fakes=fakes) as site:
        answer = await site.client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer gw-key"},
        )
        assert answer.status_code == 503
        assert answer.content == fake_error(503)  # the last upstream's own answer
        (row,) = await _records(site, 1)
        assert row["upstream"] == "local"
        assert [a["upstream"] for a in row["attempts"]] == ["openai", "azure", "local"]


async def test_an_unreachable_upstream_falls_over_and_is_recorded_as_such(
    tmp_path: Path,
) -> None:
    fakes = {"azure.test": FakeUpstream(), "local.test": FakeUpstream()}  # openai.test refuses
    async with gateway(tmp_path, env=BASE, fakes=fakes) as site:
        answer = await site.client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer gw-key"},
        )
        assert answer.status_code == 200
        (row,) = await _records(site, 1)
        assert row["attempts"][0] == {
            "upstream": "openai",
            "error": "upstream_unreachable",
            "ms": row["attempts"][0]["ms"],
        }
        assert row["upstream"] == "azure"


async def test_a_model_no_upstream_serves_is_404_in_each_apis_shape(tmp_path: Path) -> None:
    async with gateway(tmp_path, env=BASE, fakes=_fakes()) as site:
        headers = {"Authorization": "Bearer gw-key"}
        answer = await site.client.post(
            "/v1/chat/completions",
            json={"model": "mistral-large", "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
        )
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "model_not_found"
        assert "mistral-large" in answer.json()["error"]["message"]
        anthropic = await site.client.post(
            "/v1/messages",
            json={"model": "gpt-4o", "max_tokens": 5, "messages": []},
            headers={"x-api-key": "gw-key", "anthropic-version": "2023-06-01"},
        )
        assert anthropic.status_code == 404
        assert anthropic.json()["type"] == "error"
        assert anthropic.json()["error"]["type"] == "not_found_error"
        unauthorised = await site.client.post(
            "/v1/messages", json={"model": "claude-x"}, headers={"x-api-key": "wrong"}
        )
        assert unauthorised.status_code == 401
        assert unauthorised.json()["error"]["type"] == "authentication_error"


async def test_the_model_list_merges_the_openai_upstreams_and_leaves_out_one_down(
    tmp_path: Path,
) -> None:
    fakes = {
        "openai.test": FakeUpstream(models=["gpt-4o", "o3-mini"]),
        "azure.test": FakeUpstream(models=["gpt-4o"], behaviour={"X-Fake-Status": "500"}),
        "local.test": FakeUpstream(models=["llama3", "gpt-4o"]),
    }
    async with gateway(tmp_path, env=BASE, fakes=fakes) as site:
        listed = [model.id async for model in _client(site).models.list()]
        assert listed == ["gpt-4o", "o3-mini", "llama3"]
        one = await site.client.get("/v1/models/llama3", headers={"Authorization": "Bearer gw-key"})
        assert one.json()["id"] == "llama3"
        assert fakes["local.test"].received[-1][1] == "/v1/models/llama3"
