"""The cost of every record: genai-prices' own figures (to float precision) for the models it
knows, by provider, tier and kind of token; MES_PRICES_FILE's where it names the model;
nothing, never 0, for a model neither knows. Computed in the writer and read back through
the admin API and its statistics (the fast tier)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from genai_prices import Usage, calc_price

from gateway.settings import ConfigError, Settings
from storage.prices import PACKAGE, Counted, Prices, provider_of, read_prices_file
from tests.in_process import ADMIN_KEY, gateway

DAY = date(2026, 12, 3)


@pytest.mark.parametrize(
    ("provider", "model", "tokens"),
    [
        ("openai", "gpt-4o-2024-08-06", Counted(prompt=1200, output=300, cache_read=1024)),
        ("openai", "o3-mini", Counted(prompt=500, output=2000)),
        ("anthropic", "claude-sonnet-4-5", Counted(1000, 100, cache_read=200, cache_write=300)),
        # past 200,000 input tokens every token costs Sonnet's higher rate
        ("anthropic", "claude-sonnet-4-5", Counted(250_000, 900, cache_read=20_000)),
        (None, "gpt-4o-mini", Counted(prompt=50, output=7)),  # a local proxy: by model
    ],
)
def test_costs_are_genai_prices_own(provider: str | None, model: str, tokens: Counted) -> None:
    cost, version = Prices().cost(provider, model, tokens, DAY)
    usage = Usage(
        input_tokens=tokens.prompt,
        output_tokens=tokens.output,
        cache_read_tokens=tokens.cache_read,
        cache_write_tokens=tokens.cache_write,
    )
    at = datetime(2026, 12, 3, 12, tzinfo=UTC)
    chosen = {"provider_id": provider} if provider else {}
    own = float(calc_price(usage, model, genai_request_timestamp=at, **chosen).total_price)
    assert cost == pytest.approx(own, rel=1e-9)
    assert version == PACKAGE


def test_a_model_no_one_prices_has_no_cost_and_a_file_prices_it(tmp_path: Path) -> None:
    assert Prices().cost(None, "llama3.1:8b", Counted(100, 10), DAY) == (None, None)
    assert Prices().cost("openai", None, Counted(100, 10), DAY) == (None, None)
    file = tmp_path / "prices.json"
    file.write_text(
        '{"llama3*": {"input": 0.1, "output": 0.2},'
        ' "gpt-4o": {"input": 2.0, "cached_input": 1.0, "output": 8.0}}'
    )
    prices = Prices(*read_prices_file(str(file)))
    cost, version = prices.cost(None, "llama3.1:8b", Counted(1_000_000, 500_000), DAY)
    assert cost == pytest.approx(0.1 + 0.1)
    assert version is not None and version.startswith("prices-file ")
    negotiated, _ = prices.cost("openai", "gpt-4o", Counted(1_000_000, 0, cache_read=500_000), DAY)
    assert negotiated == pytest.approx(0.5 * 2.0 + 0.5 * 1.0)
    assert prices.cost("openai", "gpt-4o-mini", Counted(10, 1), DAY)[1] == PACKAGE  # not named


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not json", "cannot be read as JSON"),
        ("[]", "must be a JSON object"),
        ('{"m": {"input": 1}}', "no 'output' price"),
        ('{"m": {"input": -1, "output": 1}}', "not a price >= 0"),
        ('{"m": {"input": 1, "output": 1, "per_call": 2}}', "unknown prices"),
    ],
)
def test_a_prices_file_that_says_no_price_stops_the_start(
    tmp_path: Path, text: str, says: str
) -> None:
    file = tmp_path / "prices.json"
    file.write_text(text)
    with pytest.raises(ConfigError, match=f"MES_PRICES_FILE .*{says}"):
        Settings.from_env({"MES_PRICES_FILE": str(file)})
    with pytest.raises(ConfigError, match="MES_PRICES_FILE cannot be read"):
        Settings.from_env({"MES_PRICES_FILE": str(tmp_path / "missing.json")})


def test_the_provider_is_named_or_known_by_its_address() -> None:
    assert provider_of("https://api.openai.com/v1", None) == "openai"
    assert provider_of("https://api.anthropic.com/v1", None) == "anthropic"
    assert provider_of("http://127.0.0.1:11434/v1", None) is None
    assert provider_of("https://llm-proxy.internal/v1", "azure") == "azure"


async def test_records_and_statistics_carry_their_cost(tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"local-*": {"input": 1.0, "output": 2.0}}')
    async with gateway(tmp_path, prices_file=str(prices)) as site:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        _, key = await site.new_user("ann")
        async with site.as_user(key) as client:
            for model in ("gpt-4o", "local-llama", "mystery-model"):
                answer = await client.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                )
                assert answer.status_code == 200
        await site.written(3)
        listed = await site.client.get("/admin/stats?by=model", headers=admin)
        by_model = {row["key"]: row for row in listed.json()["data"]}
        rows = {row["requested_model"]: row for row in await site.history.completions()}
        metrics = (await site.client.get("/metrics")).text
    known = rows["gpt-4o"]
    usage = orjson.loads(known["usage"])
    own = calc_price(
        Usage(
            input_tokens=usage["prompt_tokens"],
            output_tokens=usage["completion_tokens"],
            cache_read_tokens=usage["prompt_tokens_details"]["cached_tokens"],
        ),
        known["response_model"],
        genai_request_timestamp=known["started_at"].replace(tzinfo=UTC),
    )
    assert known["cost_usd"] == pytest.approx(float(own.total_price), rel=1e-3)
    assert known["price_version"] == PACKAGE
    local = rows["local-llama"]
    assert local["cost_usd"] == pytest.approx(
        (local["prompt_tokens"] * 1.0 + local["completion_tokens"] * 2.0) / 1e6
    )
    assert rows["mystery-model"]["cost_usd"] is None  # unpriced, not 0
    stats: dict[str, Any] = by_model
    assert stats["gpt-4o-2024-08-06"]["cost_usd"] == pytest.approx(known["cost_usd"])
    assert stats["mystery-model-2024-08-06"]["cost_usd"] is None
    counted = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mes_cost_usd_total{")
    }
    assert counted == {
        "gpt-4o-2024-08-06": pytest.approx(known["cost_usd"]),
        "local-llama-2024-08-06": pytest.approx(local["cost_usd"]),
    }
