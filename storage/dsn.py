"""Database DSNs in every form users already have, turned into SQLAlchemy async URLs.

Accepted, verbatim:

- SQLAlchemy URLs, with or without a driver: ``postgresql+asyncpg://...``,
  ``postgresql://...``, ``mysql://...``, ``mysql+aiomysql://...``, ``sqlite:///path``;
- New API / Go style: ``postgres://user:pass@host:5432/db`` and
  ``user:pass@tcp(host:3306)/db?charset=utf8mb4&parseTime=True``;
- a plain SQLite file path (``mes.db``, ``/var/lib/mes/history.sqlite``).

Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

Kind = Literal["sqlite", "postgresql", "mysql"]

_DRIVERS: dict[Kind, str] = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
}
_SCHEMES: dict[str, Kind] = {
    "sqlite": "sqlite",
    "postgres": "postgresql",
    "postgresql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
}
_GO_MYSQL_ADDRESS = re.compile(
    r"^(?:(?P<protocol>tcp|unix)\((?P<address>[^)]*)\))?/(?P<database>[^?]+)(?:\?(?P<query>.*))?$",
    re.DOTALL,
)
# Go driver options that mean nothing to aiomysql; charset is kept.
_GO_ONLY_OPTIONS = {"parsetime", "loc", "timeout", "readtimeout", "writetimeout", "collation"}


class DSNError(ValueError):
    """A DSN could not be understood."""


@dataclass(frozen=True)
class DatabaseURL:
    kind: Kind
    url: URL

    @property
    def database(self) -> str | None:
        return self.url.database

    def rendered(self) -> str:
        """The URL with its password hidden, for logs and health reports."""
        return self.url.render_as_string(hide_password=True)


def parse_dsn(dsn: str) -> DatabaseURL:
    """Turn any accepted DSN form into a SQLAlchemy URL with an async driver."""
    text = dsn.strip()
    if not text:
        raise DSNError("the DSN is empty")
    if "://" in text:
        return _from_url(text)
    if "@tcp(" in text or "@unix(" in text or text.startswith(("tcp(", "unix(")):
        return _from_go_mysql(text)
    return DatabaseURL("sqlite", URL.create(_DRIVERS["sqlite"], database=text))


def _from_url(text: str) -> DatabaseURL:
    scheme = text.split("://", 1)[0]
    backend = scheme.split("+", 1)[0].lower()
    kind = _SCHEMES.get(backend)
    if kind is None:
        raise DSNError(f"unsupported database scheme {scheme!r} (use sqlite, postgresql or mysql)")
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise DSNError(str(exc)) from None
    url = url.set(drivername=_DRIVERS[kind])
    if kind == "postgresql":
        url = _asyncpg_query(url)
    if kind == "mysql" and "charset" not in url.query:
        url = url.update_query_dict({"charset": "utf8mb4"})
    return DatabaseURL(kind, url)


def _asyncpg_query(url: URL) -> URL:
    """libpq's ``sslmode`` is spelled ``ssl`` by asyncpg."""
    if "sslmode" not in url.query:
        return url
    query = dict(url.query)
    query["ssl"] = query.pop("sslmode")
    return url.set(query=query)


def _from_go_mysql(text: str) -> DatabaseURL:
    # The password may itself hold '@': the address starts after the last one.
    head, sep, tail = text.rpartition("@")
    credentials, rest = (head, tail) if sep else ("", text)
    match = _GO_MYSQL_ADDRESS.match(rest)
    if match is None:
        raise DSNError("a Go-style MySQL DSN looks like user:password@tcp(host:3306)/database")
    user, _, password = credentials.partition(":")
    query = {
        key: value
        for key, value in parse_qsl(match.group("query") or "")
        if key.lower() not in _GO_ONLY_OPTIONS
    }
    query.setdefault("charset", "utf8mb4")
    host: str | None = "127.0.0.1"
    port: int | None = 3306
    address = match.group("address") or ""
    if match.group("protocol") == "unix":
        query["unix_socket"] = address
        host, port = "localhost", None
    elif address:
        host, _, port_text = address.rpartition(":") if ":" in address else (address, "", "")
        port = int(port_text) if port_text else 3306
    url = URL.create(
        _DRIVERS["mysql"],
        username=unquote(user) or None,
        password=unquote(password) or None,
        host=host,
        port=port,
        database=match.group("database"),
        query=query,
    )
    return DatabaseURL("mysql", url)
