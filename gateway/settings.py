"""The gateway's settings: read once from the environment, frozen, secrets out of ``repr``.

Every variable is documented in the README; ``tests/test_docs.py`` fails when one is not.
A misconfiguration fails at start with a sentence that names the variable.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

DEFAULT_SQLITE_PATH = "mes_gateway.db"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: str | None = field(default=None, repr=False)
    gateway_keys: frozenset[str] = field(default=frozenset(), repr=False)
    sql_dsn: str | None = field(default=None, repr=False)
    mes_sql_dsn: str | None = field(default=None, repr=False)
    sqlite_path: str = DEFAULT_SQLITE_PATH
    mes_daily_partition: bool = False
    mes_retention_days: int = 0
    content_retention_days: int = 0
    capture_content: bool = True
    maintenance_interval: float = 3600.0
    retention_step: int = 100
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
    spool_dir: str = "mes_spool"
    spool_max_bytes: int = 2**30
    redact_patterns: tuple[str, ...] = ()
    shutdown_grace_seconds: float = 10.0
    stall_seconds: float = 30.0
    db_pool_size: int = 5
    trusted_proxies: tuple[IPNetwork, ...] = ()
    log_level: str = "info"

    @property
    def managed_mode(self) -> bool:
        """True when the gateway holds the upstream key and clients present gateway keys."""
        return self.upstream_api_key is not None

    @property
    def main_dsn(self) -> str:
        return self.sql_dsn or self.sqlite_path

    @property
    def history_dsn(self) -> str:
        return self.mes_sql_dsn or self.main_dsn

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = Reader(os.environ if environ is None else environ)
        settings = cls(
            upstream_base_url=env.text("UPSTREAM_BASE_URL", cls.upstream_base_url).rstrip("/"),
            upstream_api_key=env.optional("UPSTREAM_API_KEY"),
            gateway_keys=frozenset(env.names("GATEWAY_KEYS")),
            sql_dsn=env.optional("SQL_DSN"),
            mes_sql_dsn=env.optional("MES_SQL_DSN"),
            sqlite_path=env.text("MES_SQLITE_PATH", DEFAULT_SQLITE_PATH),
            mes_daily_partition=env.flag("MES_DAILY_PARTITION", False),
            mes_retention_days=env.integer("MES_RETENTION_DAYS", 0, minimum=0),
            content_retention_days=env.integer("MES_CONTENT_RETENTION_DAYS", 0, minimum=0),
            capture_content=env.flag("MES_CAPTURE_CONTENT", True),
            maintenance_interval=env.number("MES_MAINTENANCE_INTERVAL", cls.maintenance_interval),
            retention_step=env.integer("MES_RETENTION_STEP", cls.retention_step, minimum=1),
            gateway_admin_key=env.optional("GATEWAY_ADMIN_KEY"),
            ui_secret=env.optional("MES_UI_SECRET"),
            host=env.text("HOST", cls.host),
            port=env.integer("PORT", cls.port, minimum=0),
            workers=env.integer("GATEWAY_WORKERS", cls.workers, minimum=1),
            max_body_bytes=env.integer("GATEWAY_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            upstream_connect_timeout=env.number(
                "UPSTREAM_CONNECT_TIMEOUT", cls.upstream_connect_timeout
            ),
            upstream_timeout=env.number("UPSTREAM_TIMEOUT", cls.upstream_timeout),
            upstream_max_connections=env.integer(
                "UPSTREAM_MAX_CONNECTIONS", cls.upstream_max_connections, minimum=1
            ),
            capture=env.flag("MES_CAPTURE", True),
            capture_batch_size=env.integer("MES_BATCH_SIZE", cls.capture_batch_size, minimum=1),
            capture_flush_interval=env.number("MES_FLUSH_INTERVAL", cls.capture_flush_interval),
            capture_retry_seconds=env.number("MES_RETRY_SECONDS", cls.capture_retry_seconds),
            spool_dir=env.text("MES_SPOOL_DIR", cls.spool_dir),
            spool_max_bytes=env.integer("MES_SPOOL_MAX_BYTES", cls.spool_max_bytes, minimum=1024),
            redact_patterns=env.patterns("MES_REDACT_PATTERNS"),
            shutdown_grace_seconds=env.number("GATEWAY_SHUTDOWN_GRACE", cls.shutdown_grace_seconds),
            stall_seconds=env.number("MES_STALL_SECONDS", cls.stall_seconds),
            db_pool_size=env.integer("DB_POOL_SIZE", cls.db_pool_size, minimum=1),
            trusted_proxies=env.networks("TRUSTED_PROXIES"),
            log_level=env.text("LOG_LEVEL", cls.log_level).lower(),
        )
        if settings.managed_mode and not (settings.gateway_keys or settings.gateway_admin_key):
            raise ConfigError(
                "UPSTREAM_API_KEY is set (managed mode) but neither GATEWAY_KEYS nor "
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
        if not settings.upstream_base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"UPSTREAM_BASE_URL must start with http:// or https://, "
                f"got {settings.upstream_base_url!r}."
            )
        return settings


class Reader:
    """Typed access to environment variables; every failure names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def optional(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def patterns(self, name: str) -> tuple[str, ...]:
        """A JSON array of regular expressions (commas are common in patterns)."""
        raw = self.optional(name)
        if raw is None:
            return ()
        try:
            patterns = orjson.loads(raw)
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError("not a JSON array of strings")
            for pattern in patterns:
                re.compile(pattern)
        except (ValueError, re.error) as error:
            raise ConfigError(
                f'{name} must be a JSON array of regular expressions, like ["sk-[A-Za-z0-9]+"]: '
                f"{error}"
            ) from None
        return tuple(patterns)

    def names(self, name: str) -> list[str]:
        raw = self.optional(name) or ""
        return [item.strip() for item in raw.split(",") if item.strip()]

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}.") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}.")
        return value

    def number(self, name: str, default: float) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}.") from None
        if value <= 0:
            raise ConfigError(f"{name} must be greater than 0, got {raw!r}.")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.optional(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}.")

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        networks = []
        for item in self.names(name):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(
                    f"{name} must list IP addresses or CIDR networks, got {item!r}."
                ) from None
        return tuple(networks)
