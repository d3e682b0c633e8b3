"""What each record cost, in US dollars, computed in the writer from its usage: from the
``genai-prices`` package (by provider, answering model and the day of the call), or from
``MES_PRICES_FILE`` where it names the model.

``genai-prices`` computes a price in ~200 µs (Decimals, and a usage it first normalises), as
much as the rest of a record's writing. A price is linear in each kind of token, at the rate
of the tier the call's input tokens fall in (providers charge a whole long prompt the higher
rate), so the writer asks the package once for each rate of a provider, model, day and tier,
and then multiplies: the rates are the package's own, and so are the costs, to float
precision.

A model neither knows has no cost: None, which the read APIs show as such, never as 0.
The package (a quarter of a second to import, and its price tables) is loaded on the first
record to price, in the writer: never by the gateway's process.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from importlib.metadata import version
from typing import Any

import orjson

from capture.rows import Row, RowSet, dig

log = logging.getLogger("mes.prices")

PACKAGE = f"genai-prices {version('genai-prices')}"
# The providers genai-prices knows by their API's address, as an upstream's base URL names it.
KNOWN_HOSTS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral",
    "api.deepseek.com": "deepseek",
    "api.x.ai": "x-ai",
    "generativelanguage.googleapis.com": "google",
    "openrouter.ai": "openrouter",
    "api.together.xyz": "together",
    "api.fireworks.ai": "fireworks",
    "api.cohere.com": "cohere",
    "api.perplexity.ai": "perplexity",
}
# The kinds of token a rate is kept for, in order.
KINDS = ("input", "cache_read", "cache_write", "output", "input_audio", "output_audio")
Rates = tuple[float, float, float, float, float, float]  # dollars per token, by KINDS


class PricesFileError(ValueError):
    """``MES_PRICES_FILE`` cannot be read, or says something that is not a price."""


@dataclass(frozen=True, slots=True)
class Counted:
    """The tokens of one call, as the record counts them: ``prompt`` is every input token
    billed, cache reads and writes and audio included; ``output`` reasoning included."""

    prompt: int
    output: int
    cache_read: int = 0
    cache_write: int = 0
    input_audio: int = 0
    output_audio: int = 0


def provider_of(base_url: str, named: str | None) -> str | None:
    """An upstream's provider: the one ``UPSTREAM_<NAME>_PROVIDER`` names, else the one whose
    API its base URL is; None for any other (a local model, a proxy)."""
    if named:
        return named
    host = base_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return KNOWN_HOSTS.get(host)


def read_prices_file(path: str) -> tuple[dict[str, Rates], str]:
    """``MES_PRICES_FILE``: a JSON object of model names (or glob patterns) to prices in
    dollars per million tokens, ``{"llama3*": {"input": 0.1, "output": 0.2}}``, with
    ``cached_input`` and ``cache_write`` optional (the input price where not given); and a
    version for the records, the file's digest."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
        found = orjson.loads(raw)
    except (OSError, orjson.JSONDecodeError) as error:
        raise PricesFileError(f"cannot be read as JSON ({error})") from None
    if not isinstance(found, dict) or not found:
        raise PricesFileError('must be a JSON object of models, like {"llama3*": {...}}')
    rates: dict[str, Rates] = {}
    for model, price in found.items():
        if not isinstance(price, dict):
            raise PricesFileError(f"gives {model!r} no object of prices")
        unknown = set(price) - {"input", "cached_input", "cache_write", "output"}
        if unknown:
            raise PricesFileError(f"gives {model!r} unknown prices {sorted(unknown)}")
        for name in ("input", "output"):
            if name not in price:
                raise PricesFileError(f"gives {model!r} no {name!r} price")
        for name, value in price.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise PricesFileError(f"gives {model!r} a {name!r} that is not a price >= 0")
        per_token = {name: float(value) / 1e6 for name, value in price.items()}
        given, output = per_token["input"], per_token["output"]
        rates[model] = (
            given,
            per_token.get("cached_input", given),
            per_token.get("cache_write", given),
            output,
            given,
            output,
        )
    return rates, "prices-file " + hashlib.sha256(raw).hexdigest()[:12]


class Prices:
    """The cost of a call by its upstream's provider, its model and its tokens."""

    def __init__(
        self, own: Mapping[str, Rates] | None = None, own_version: str | None = None
    ) -> None:
        self._own = dict(own or {})
        self._own_version = own_version
        self._models: dict[tuple[str | None, str, date], _Model | None] = {}
        self._rates: dict[tuple[str | None, str, date, int], Rates] = {}

    def cost(
        self, provider: str | None, model: str | None, tokens: Counted, day: date
    ) -> tuple[float | None, str | None]:
        """The cost of a call in dollars and the version of the prices it came from; (None,
        None) for a model with no known price."""
        if not model:
            return None, None
        own = self._own_rates(model)
        if own is not None:
            return _apply(own, tokens), self._own_version
        known = self._model(provider, model, day)
        if known is None:
            return None, None
        tier = sum(1 for start in known.tiers if tokens.prompt > start)
        key = (provider, model, day, tier)
        rates = self._rates.get(key)
        if rates is None:
            rates = self._rates[key] = known.rates(max(tokens.prompt, 1))
        return _apply(rates, tokens), PACKAGE

    def _own_rates(self, model: str) -> Rates | None:
        if not self._own:
            return None
        exact = self._own.get(model)
        if exact is not None:
            return exact
        for pattern, rates in self._own.items():
            if fnmatch.fnmatchcase(model, pattern):
                return rates
        return None

    def _model(self, provider: str | None, model: str, day: date) -> _Model | None:
        key = (provider, model, day)
        if key not in self._models:
            self._models[key] = _Model.find(provider, model, day)
        return self._models[key]


def _apply(rates: Rates, tokens: Counted) -> float:
    uncached = tokens.prompt - tokens.cache_read - tokens.cache_write - tokens.input_audio
    return (
        max(uncached, 0) * rates[0]
        + tokens.cache_read * rates[1]
        + tokens.cache_write * rates[2]
        + max(tokens.output - tokens.output_audio, 0) * rates[3]
        + tokens.input_audio * rates[4]
        + tokens.output_audio * rates[5]
    )


@dataclass(frozen=True, slots=True)
class _Model:
    """A model genai-prices knows, from one provider, on one day."""

    provider: str | None
    model: str
    at: datetime
    tiers: tuple[int, ...]  # input token counts past which another rate applies

    @classmethod
    def find(cls, provider: str | None, model: str, day: date) -> _Model | None:
        from genai_prices import Usage
        from genai_prices.types import TieredPrices

        at = datetime.combine(day, time(12), tzinfo=UTC)
        try:
            found = _price(Usage(input_tokens=1), model, provider, at)
        except LookupError:
            log.info("no price known for model %r (provider %s): unpriced", model, provider)
            return None
        starts: set[int] = set()
        for value in vars(found.model_price).values():
            if isinstance(value, TieredPrices):
                starts.update(int(tier.start) for tier in value.tiers)
        return cls(provider, model, at, tuple(sorted(starts)))

    def rates(self, prompt: int) -> Rates:
        """Dollars per token of each kind, for a call of ``prompt`` input tokens: each the
        package's price of ``prompt`` tokens of that kind (the same tier), divided."""
        from genai_prices import Usage

        def price(**usage: int) -> float:
            return float(_price(Usage(**usage), self.model, self.provider, self.at).total_price)

        n = prompt
        base = price(input_tokens=n)
        return (
            base / n,
            price(input_tokens=n, cache_read_tokens=n) / n,
            price(input_tokens=n, cache_write_tokens=n) / n,
            (price(input_tokens=n, output_tokens=n) - base) / n,
            price(input_tokens=n, input_audio_tokens=n) / n,
            (price(input_tokens=n, output_tokens=n, output_audio_tokens=n) - base) / n,
        )


def _price(usage: Any, model: str, provider: str | None, at: datetime) -> Any:
    """genai-prices' price: of this provider, or, with none, of whichever serves the model."""
    from genai_prices import calc_price

    if provider is None:
        return calc_price(usage, model, genai_request_timestamp=at)
    return calc_price(usage, model, provider_id=provider, genai_request_timestamp=at)


def upstream_provider(providers: Mapping[str, str | None], row: Row) -> str | None:
    """The provider of the upstream that answered ``row``'s call, from ``providers`` by
    upstream name (a gateway with one upstream names it ``default``)."""
    return providers.get(row.get("upstream") or "default")


class Pricer:
    """Each record's cost, put in its completion row as the writer shapes it: by the
    provider of the upstream that answered (``providers``, by upstream name), the model
    that answered (or was asked for), the day, and the tokens the row counts."""

    def __init__(self, prices: Prices, providers: Mapping[str, str | None]) -> None:
        self.prices = prices
        self.providers = dict(providers)

    def rows(self, rowset: RowSet) -> RowSet:
        row = rowset.completion
        if row is not None:
            row["cost_usd"], row["price_version"] = self.cost(row)
        return rowset

    def cost(self, row: Row) -> tuple[float | None, str | None]:
        prompt, output = row["prompt_tokens"], row["completion_tokens"]
        if prompt is None and output is None:  # no usage: nothing to price
            return None, None
        audio_in, audio_out = _audio(row.get("usage"))
        tokens = Counted(
            prompt=prompt or 0,
            output=output or 0,
            cache_read=row.get("cached_tokens") or 0,
            cache_write=row.get("cache_write_tokens") or 0,
            input_audio=audio_in,
            output_audio=audio_out,
        )
        provider = upstream_provider(self.providers, row)
        model = row.get("response_model") or row.get("requested_model")
        cost, version = self.prices.cost(provider, model, tokens, row["started_at"].date())
        return (None if cost is None else round(cost, 12)), version  # to 1e-12 dollars


_SOME_AUDIO = re.compile(r'"audio_tokens":\s*[1-9]')


def _audio(usage: str | None) -> tuple[int, int]:
    """Chat's audio tokens, in and out, from its usage (read only when there are some)."""
    if not usage or not _SOME_AUDIO.search(usage):
        return 0, 0
    found = orjson.loads(usage)
    counts = []
    for details in ("prompt_tokens_details", "completion_tokens_details"):
        value = dig(found, details, "audio_tokens")
        counts.append(value if isinstance(value, int) else 0)
    return counts[0], counts[1]
