"""The gateway's settings: read once from the environment, frozen, secrets out of ``repr``.

``VARIABLES`` is the table of environment variables, as data: each one's setting, reader and
line of doc. ``from_env`` reads it; the README's table is tested against it, and ``python -m
gateway --help`` prints it. A misconfiguration fails at start with a sentence that names the
variable.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from storage.prices import read_prices_file

DEFAULT_SQLITE_PATH = "mes_gateway.db"
FORMATS = ("openai", "anthropic")

log = logging.getLogger("mes.settings")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class UpstreamSpec:
    """One of several upstreams (``UPSTREAMS``), from its ``UPSTREAM_<NAME>_*`` variables."""

    name: str
    base_url: str = ""
    api_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = ("*",)
    format: str = "openai"
    fallbacks: tuple[str, ...] = ()
    provider: str | None = None  # genai-prices' id, for prices; else from the base URL


@dataclass(frozen=True)
class Settings:
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: str | None = field(default=None, repr=False)
    upstream_names: tuple[str, ...] = ()
    # Made by ``from_env`` from UPSTREAM_VARIABLES, one for each of ``upstream_names``.
    upstreams: tuple[UpstreamSpec, ...] = ()
    gateway_keys: frozenset[str] = field(default=frozenset(), repr=False)
    sql_dsn: str | None = field(default=None, repr=False)
    mes_sql_dsn: str | None = field(default=None, repr=False)
    mes_sql_read_dsn: str | None = field(default=None, repr=False)
    otel_endpoint: str | None = None
    otel_traces_endpoint: str | None = None
    otel_content: bool = False
    queue_url: str | None = field(default=None, repr=False)  # may hold Redis' password
    queue_claim_seconds: float = 60.0
    queue_durable_seconds: float = 2.0
    sqlite_path: str = DEFAULT_SQLITE_PATH
    mes_daily_partition: bool = False
    mes_retention_days: int = 0
    content_retention_days: int = 0
    capture_content: bool = True
    maintenance_interval: float = 3600.0
    retention_step: int = 100
    archive_dir: str | None = None
    gateway_admin_key: str | None = field(default=None, repr=False)
    ui_secret: str | None = field(default=None, repr=False)
    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 1
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_connect_timeout: float = 10.0
    upstream_timeout: float = 600.0
    upstream_max_connections: int = 512
    capture: bool = True
    capture_batch_size: int = 200
    capture_flush_interval: float = 0.2
    capture_retry_seconds: float = 5.0
    writer_nice: int = 10
    spool_dir: str = "mes_spool"
    spool_max_bytes: int = 2**30
    redact_patterns: tuple[str, ...] = ()
    shutdown_grace_seconds: float = 10.0
    stall_seconds: float = 30.0
    db_pool_size: int = 5
    db_max_overflow: int | None = None  # None: as many as db_pool_size
    db_pool_recycle: float = 1800.0
    db_connect_timeout: float = 5.0
    auto_migrate: bool = True
    trusted_proxies: tuple[IPNetwork, ...] = ()
    log_level: str = "info"
    log_format: str = "text"
    prices_file: str | None = None

    @property
    def managed_mode(self) -> bool:
        """True when the gateway holds an upstream's key and clients present gateway keys
        (which then reach no upstream, whether it has a key of the gateway's or not)."""
        if self.upstreams:
            return any(spec.api_key is not None for spec in self.upstreams)
        return self.upstream_api_key is not None

    @property
    def pool(self) -> dict[str, Any]:
        """``storage.database.create_engine``'s pool options."""
        return {
            "pool_size": self.db_pool_size,
            "max_overflow": self.db_max_overflow,
            "recycle": self.db_pool_recycle,
            "connect_timeout": self.db_connect_timeout,
        }

    @property
    def otel_enabled(self) -> bool:
        """Stored records are exported as OpenTelemetry spans (``storage/telemetry.py``)."""
        return bool(self.otel_endpoint or self.otel_traces_endpoint)

    @property
    def main_dsn(self) -> str:
        return self.sql_dsn or self.sqlite_path

    @property
    def history_dsn(self) -> str:
        return self.mes_sql_dsn or self.main_dsn

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        settings = cls(**{v.field: v.read(env, getattr(cls, v.field)) for v in VARIABLES})
        if settings.upstream_names:
            settings = replace(settings, upstreams=upstream_specs(settings.upstream_names, env))
            ignored = [name for name in ("UPSTREAM_BASE_URL", "UPSTREAM_API_KEY") if env.get(name)]
            if ignored:
                log.warning(
                    "UPSTREAMS is set: %s not used (each upstream has its own "
                    "UPSTREAM_<NAME>_BASE_URL and UPSTREAM_<NAME>_API_KEY)",
                    " and ".join(ignored) + (" is" if len(ignored) == 1 else " are"),
                )
        if settings.managed_mode and not (settings.gateway_keys or settings.gateway_admin_key):
            keys = "an UPSTREAM_<NAME>_API_KEY" if settings.upstreams else "UPSTREAM_API_KEY"
            raise ConfigError(
                f"{keys} is set (managed mode) but neither GATEWAY_KEYS nor "
                "GATEWAY_ADMIN_KEY is: set GATEWAY_KEYS to the comma-separated keys clients "
                "may use, or GATEWAY_ADMIN_KEY to issue keys through the admin API."
            )
        if (
            settings.mes_retention_days
            and settings.content_retention_days >= settings.mes_retention_days
        ):
            raise ConfigError(
                f"MES_CONTENT_RETENTION_DAYS ({settings.content_retention_days}) must be below "
                f"MES_RETENTION_DAYS ({settings.mes_retention_days}): content goes first, "
                "then the whole record; unset it to keep content as long as the record."
            )
        return settings


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable: the setting it sets, how its text is parsed (a function
    that raises ``ValueError`` saying what it must be), and a line on what it does. Unset or
    blank, the setting keeps its default."""

    name: str
    field: str
    parse: Callable[[str], Any]
    doc: str

    def read(self, environ: Mapping[str, str], default: Any) -> Any:
        raw = environ.get(self.name, "").strip()
        if not raw:
            return default
        try:
            return self.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{self.name} {error}, got {raw!r}.") from None


def text(raw: str) -> str:
    return raw


def lowered(raw: str) -> str:
    return raw.lower()


def url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return raw.rstrip("/")


def redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    for option in ("decode_responses", "protocol"):
        if f"{option}=" in raw.partition("?")[2]:
            raise ValueError(f"must not set {option}: the gateway reads Redis' replies as bytes")
    return raw


def flag(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def at_least(minimum: int, most: int | None = None) -> Callable[[str], int]:
    def integer(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("must be an integer") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        if most is not None and value > most:
            raise ValueError(f"must be at most {most}")
        return value

    return integer


def one_of(*choices: str) -> Callable[[str], str]:
    def chosen(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw.lower()

    return chosen


def seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number") from None
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def at_least_seconds(minimum: float) -> Callable[[str], float]:
    def reader(raw: str) -> float:
        value = seconds(raw)
        if value < minimum:
            raise ValueError(f"must be at least {minimum:g}")
        return value

    return reader


def names(raw: str) -> frozenset[str]:
    """Comma-separated names (keys)."""
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


def patterns(raw: str) -> tuple[str, ...]:
    """A JSON array of regular expressions (commas are common in patterns)."""
    try:
        found = orjson.loads(raw)
        if not isinstance(found, list) or not all(isinstance(p, str) for p in found):
            raise ValueError("not a JSON array of strings")
        for pattern in found:
            re.compile(pattern)
    except (ValueError, re.error) as error:
        raise ValueError(
            f'must be a JSON array of regular expressions, like ["sk-[A-Za-z0-9]+"] ({error})'
        ) from None
    return tuple(found)


def ordered_names(raw: str) -> tuple[str, ...]:
    """Comma-separated upstream names, in order, each of letters, digits and underscores."""
    found = tuple(item.strip().lower() for item in raw.split(",") if item.strip())
    for name in found:
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(f"must list names of letters, digits and underscores ({name!r})")
    if len(set(found)) != len(found):
        raise ValueError("must not name an upstream twice")
    return found


def globs(raw: str) -> tuple[str, ...]:
    """Comma-separated glob patterns of model names (``gpt-*,o3*``)."""
    found = tuple(item.strip() for item in raw.split(",") if item.strip())
    if not found:
        raise ValueError("must list at least one model pattern, like gpt-*,o3*")
    return found


def api_format(raw: str) -> str:
    if raw.lower() not in FORMATS:
        raise ValueError(f"must be one of {', '.join(FORMATS)}")
    return raw.lower()


def prices_file(raw: str) -> str:
    """A JSON file of prices (read now, so that a mistake stops the start)."""
    read_prices_file(raw)
    return raw


def networks(raw: str) -> tuple[IPNetwork, ...]:
    found = []
    for item in (item.strip() for item in raw.split(",")):
        if not item:
            continue
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"must list IP addresses or CIDR networks ({item!r} is not)") from None
    return tuple(found)


def upstream_specs(names: tuple[str, ...], environ: Mapping[str, str]) -> tuple[UpstreamSpec, ...]:
    """The upstreams ``UPSTREAMS`` names, each from its own variables; refused, naming the
    variable, when one has no base URL, or its fallbacks name an unknown upstream, one of
    another format, or lead back to it."""
    specs = []
    for name in names:
        fields = {}
        for template in UPSTREAM_VARIABLES:
            named = replace(template, name=template.name.replace("<NAME>", name.upper()))
            fields[template.field] = named.read(environ, getattr(UpstreamSpec, template.field))
        spec = UpstreamSpec(name=name, **fields)
        if not spec.base_url:
            raise ConfigError(
                f"UPSTREAM_{name.upper()}_BASE_URL is not set: each upstream UPSTREAMS names "
                "needs the URL its /v1 requests go to."
            )
        specs.append(spec)
    by_name = {spec.name: spec for spec in specs}
    for spec in specs:
        listed = f"UPSTREAM_{spec.name.upper()}_FALLBACKS"
        for fallback in spec.fallbacks:
            if fallback not in by_name:
                raise ConfigError(
                    f"{listed} names {fallback!r}, which UPSTREAMS does not ({', '.join(names)})."
                )
            if by_name[fallback].format != spec.format:
                raise ConfigError(
                    f"{listed} names {fallback!r}, whose format is "
                    f"{by_name[fallback].format}, not {spec.format}: the gateway translates "
                    "nothing, so a fallback speaks the format of the upstream it stands in for."
                )
    for spec in specs:
        cycle = _cycle(spec.name, by_name, [])
        if cycle:
            raise ConfigError(
                f"UPSTREAM_{cycle[-2].upper()}_FALLBACKS leads back to {cycle[-1]!r} "
                f"({' -> '.join(cycle)}): fallbacks must not form a cycle."
            )
    return tuple(specs)


def _cycle(name: str, by_name: Mapping[str, UpstreamSpec], path: list[str]) -> list[str]:
    """The fallback path from ``path`` back to one of its names, or an empty list."""
    if name in path:
        return [*path[path.index(name) :], name]
    for fallback in by_name[name].fallbacks:
        found = _cycle(fallback, by_name, [*path, name])
        if found:
            return found
    return []


VARIABLES: tuple[Variable, ...] = (
    Variable("UPSTREAM_BASE_URL", "upstream_base_url", url, "where /v1 requests go"),
    Variable(
        "UPSTREAM_API_KEY",
        "upstream_api_key",
        text,
        "set: managed mode, the gateway's key upstream; unset: the client's key goes on",
    ),
    Variable(
        "UPSTREAMS",
        "upstream_names",
        ordered_names,
        "several upstreams, by name: each has the UPSTREAM_<NAME>_* variables below",
    ),
    Variable("GATEWAY_KEYS", "gateway_keys", names, "managed mode: keys clients may present"),
    Variable("SQL_DSN", "sql_dsn", text, "main database (users, keys)"),
    Variable("MES_SQL_DSN", "mes_sql_dsn", text, "history database"),
    Variable(
        "MES_SQL_READ_DSN",
        "mes_sql_read_dsn",
        text,
        "a read replica of the history database: the read APIs and the viewer read there",
    ),
    Variable(
        "MES_QUEUE",
        "queue_url",
        redis_url,
        "a Redis stream between gateways and writers (python -m gateway writer)",
    ),
    Variable(
        "MES_QUEUE_CLAIM_SECONDS",
        "queue_claim_seconds",
        at_least_seconds(1.0),
        "seconds a record may wait in a writer that does not write it before another takes it",
    ),
    Variable(
        "MES_QUEUE_DURABLE_SECONDS",
        "queue_durable_seconds",
        seconds,
        "seconds a gateway keeps a record in its spool after Redis took it",
    ),
    Variable("MES_SQLITE_PATH", "sqlite_path", text, "the SQLite file when no DSN is set"),
    Variable("MES_DAILY_PARTITION", "mes_daily_partition", flag, "split history by day"),
    Variable("MES_RETENTION_DAYS", "mes_retention_days", at_least(0), "keep history N days"),
    Variable(
        "MES_CONTENT_RETENTION_DAYS",
        "content_retention_days",
        at_least(0),
        "drop message content after M days, keep the metadata",
    ),
    Variable("MES_CAPTURE_CONTENT", "capture_content", flag, "false: store metadata only"),
    Variable(
        "MES_MAINTENANCE_INTERVAL", "maintenance_interval", seconds, "seconds between retentions"
    ),
    Variable("MES_RETENTION_STEP", "retention_step", at_least(1), "conversations pruned a step"),
    Variable(
        "MES_ARCHIVE_DIR",
        "archive_dir",
        text,
        "where retention and prunes write what they remove, first (unset: nowhere)",
    ),
    Variable("GATEWAY_ADMIN_KEY", "gateway_admin_key", text, "bearer key for /admin"),
    Variable("MES_UI_SECRET", "ui_secret", text, "signs the viewer's session cookies"),
    Variable("HOST", "host", text, "listen address"),
    Variable("PORT", "port", at_least(0), "listen port"),
    Variable("GATEWAY_WORKERS", "workers", at_least(1), "uvicorn worker processes"),
    Variable(
        "GATEWAY_MAX_BODY_BYTES", "max_body_bytes", at_least(1), "largest request body accepted"
    ),
    Variable(
        "UPSTREAM_CONNECT_TIMEOUT",
        "upstream_connect_timeout",
        seconds,
        "seconds to connect to the upstream",
    ),
    Variable(
        "UPSTREAM_TIMEOUT",
        "upstream_timeout",
        seconds,
        "seconds to wait for an answer, and between two stream chunks",
    ),
    Variable(
        "UPSTREAM_MAX_CONNECTIONS",
        "upstream_max_connections",
        at_least(1),
        "connections to the upstream",
    ),
    Variable("MES_CAPTURE", "capture", flag, "false: proxy only, record nothing"),
    Variable("MES_BATCH_SIZE", "capture_batch_size", at_least(1), "most records a transaction"),
    Variable("MES_FLUSH_INTERVAL", "capture_flush_interval", seconds, "seconds a batch may gather"),
    Variable(
        "MES_RETRY_SECONDS",
        "capture_retry_seconds",
        seconds,
        "longest wait between two writes to an unavailable database",
    ),
    Variable(
        "MES_WRITER_NICE",
        "writer_nice",
        at_least(0, 19),
        "how much lower the writer process's CPU priority is than its gateway's",
    ),
    Variable("MES_SPOOL_DIR", "spool_dir", text, "the durable spool of records"),
    Variable(
        "MES_SPOOL_MAX_BYTES", "spool_max_bytes", at_least(1024), "most bytes the spool holds"
    ),
    Variable(
        "MES_REDACT_PATTERNS",
        "redact_patterns",
        patterns,
        "JSON array of regular expressions stored as [REDACTED]",
    ),
    Variable(
        "GATEWAY_SHUTDOWN_GRACE",
        "shutdown_grace_seconds",
        seconds,
        "seconds SIGTERM spends writing the spool",
    ),
    Variable(
        "MES_STALL_SECONDS",
        "stall_seconds",
        seconds,
        "seconds the writer may be stuck before /readyz answers 503",
    ),
    Variable("DB_POOL_SIZE", "db_pool_size", at_least(1), "connections per database engine"),
    Variable(
        "DB_MAX_OVERFLOW",
        "db_max_overflow",
        at_least(0),
        "connections a busy engine may open beyond DB_POOL_SIZE (unset: as many again)",
    ),
    Variable(
        "DB_POOL_RECYCLE", "db_pool_recycle", seconds, "seconds before a connection is replaced"
    ),
    Variable(
        "DB_CONNECT_TIMEOUT",
        "db_connect_timeout",
        seconds,
        "seconds a database server may take to accept a connection",
    ),
    Variable(
        "MES_AUTO_MIGRATE",
        "auto_migrate",
        flag,
        "false: check the schemas at start instead of migrating them (python -m gateway migrate)",
    ),
    Variable(
        "TRUSTED_PROXIES", "trusted_proxies", networks, "IPs or CIDRs whose X-Forwarded-For counts"
    ),
    Variable("LOG_LEVEL", "log_level", lowered, "debug, info, warning or error"),
    Variable(
        "LOG_FORMAT",
        "log_format",
        one_of("text", "json"),
        "json: a JSON object a line, with the request's id (X-Gateway-Request-Id)",
    ),
    Variable(
        "MES_PRICES_FILE",
        "prices_file",
        prices_file,
        "JSON prices per model, for local models and negotiated prices",
    ),
    Variable(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "otel_endpoint",
        text,
        "an OTLP/HTTP collector: each stored record is exported there as a GenAI span",
    ),
    Variable(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "otel_traces_endpoint",
        text,
        "the same, the whole URL of the collector's traces endpoint",
    ),
    Variable(
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        "otel_content",
        flag,
        "true: spans carry the messages (gen_ai.input.messages, gen_ai.output.messages)",
    ),
)


# Each upstream's own, NAME upper-cased: UPSTREAM_CLAUDE_BASE_URL for "claude" in UPSTREAMS.
UPSTREAM_VARIABLES: tuple[Variable, ...] = (
    Variable("UPSTREAM_<NAME>_BASE_URL", "base_url", url, "where its requests go (required)"),
    Variable(
        "UPSTREAM_<NAME>_API_KEY",
        "api_key",
        text,
        "set: the gateway's key there (managed mode); unset: the client's key goes on",
    ),
    Variable(
        "UPSTREAM_<NAME>_MODELS",
        "models",
        globs,
        "glob patterns of the models it serves: the first upstream that matches answers",
    ),
    Variable("UPSTREAM_<NAME>_FORMAT", "format", api_format, "openai, or anthropic (/v1/messages)"),
    Variable(
        "UPSTREAM_<NAME>_FALLBACKS",
        "fallbacks",
        ordered_names,
        "upstreams tried in order when it fails before its answer begins",
    ),
    Variable(
        "UPSTREAM_<NAME>_PROVIDER",
        "provider",
        lowered,
        "its provider in genai-prices (openai, anthropic, ...), for costs",
    ),
)
