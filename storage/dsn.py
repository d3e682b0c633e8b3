"""Database DSNs in every form users already have, turned into SQLAlchemy async URLs.

Accepted, verbatim:

- SQLAlchemy URLs, with or without a driver: ``postgresql+asyncpg://...``,
  ``postgresql://...``, ``mysql://...``, ``mysql+aiomysql://...``, ``sqlite:///path``;
- New API / Go style: ``postgres://user:pass@host:5432/db`` and
  ``user:pass@tcp(host:3306)/db?charset=utf8mb4&parseTime=True``;
- a plain SQLite file path (``mes.db``, ``/var/lib/mes/history.sqlite``).

TLS to the server is asked for in the DSN, in any of the spellings those users have:
libpq's ``sslmode``/``sslrootcert``/``sslcert``/``sslkey`` for PostgreSQL; for MySQL and
MariaDB, the Go driver's ``tls=true|skip-verify|preferred|<name>``, the MySQL clients'
``ssl-mode`` and SQLAlchemy's ``ssl_ca``/``ssl_cert``/``ssl_key``. Each becomes one ``TLS``.

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

Verify = Literal["none", "ca", "full"]


class DSNError(ValueError):
    """A DSN could not be understood."""


@dataclass(frozen=True)
class TLS:
    """TLS to a database server, however the DSN spelled it.

    ``verify``: ``full`` checks the server's certificate and that it names the host the DSN
    names, ``ca`` the certificate only, ``none`` neither (encrypted, not authenticated).
    ``required``: false where TLS is used only if the server offers it. ``ca`` is the CA
    bundle the certificate is checked against (None: the system's); ``cert`` and ``key``
    a client certificate, for servers that authenticate clients by one."""

    verify: Verify
    required: bool = True
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    key_password: str | None = None


@dataclass(frozen=True)
class DatabaseURL:
    kind: Kind
    url: URL
    tls: TLS | None = None

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
        query = dict(url.query)
        tls = _postgres_tls(query)
        return DatabaseURL(kind, url.set(query=query), tls)
    if kind == "mysql":
        return _mysql(url)
    return DatabaseURL(kind, url)


def _mysql(url: URL) -> DatabaseURL:
    query = dict(url.query)
    tls = _mysql_tls(query)
    query.setdefault("charset", "utf8mb4")
    return DatabaseURL("mysql", url.set(query=query), tls)


# libpq's certificate options, by the name TLS gives them.
_LIBPQ_FILES = {
    "sslrootcert": "ca",
    "sslcert": "cert",
    "sslkey": "key",
    "sslpassword": "key_password",
}
_LIBPQ_VERIFY: dict[str, Verify] = {"require": "none", "verify-ca": "ca", "verify-full": "full"}
_SWITCHES = {"true": "verify-full", "1": "verify-full", "false": "disable", "0": "disable"}


def _postgres_tls(query: dict[str, str | tuple[str, ...]]) -> TLS | None:
    """Take libpq's TLS options out of ``query``. The modes asyncpg takes as they are
    (``disable``, ``allow``, ``prefer``, its default) stay, spelled ``ssl`` as asyncpg
    spells it; the others become a TLS, which the engine turns into an SSL context."""
    given = _option(query, "sslmode", "ssl")
    files = {
        field: value for name, field in _LIBPQ_FILES.items() if (value := _option(query, name))
    }
    # ssl=true|false, as JDBC and node-postgres DSNs say it.
    mode = _SWITCHES.get(given.lower(), given) if given else None
    if mode in (None, "disable", "allow", "prefer"):
        if files:
            named = ", ".join(name for name, field in _LIBPQ_FILES.items() if field in files)
            raise DSNError(f"{named} take effect with sslmode=verify-full, verify-ca or require")
        if mode:
            query["ssl"] = mode
        return None
    verify = _LIBPQ_VERIFY.get(mode)
    if verify is None:
        raise DSNError(
            f"sslmode={mode!r}: use disable, allow, prefer, require, verify-ca or verify-full"
        )
    if verify == "none" and "ca" in files:
        verify = "ca"  # libpq: with a root certificate, require checks it (as verify-ca)
    return TLS(verify, True, **files)


# MySQL clients' --ssl-mode values and Go's tls= values: (verify, required), None for off.
_MYSQL_MODES: dict[str, tuple[Verify, bool] | None] = {
    "disabled": None,
    "preferred": ("none", False),
    "required": ("none", True),
    "verify_ca": ("ca", True),
    "verify_identity": ("full", True),
}
_GO_TLS: dict[str, tuple[Verify, bool] | None] = {
    "false": None,
    "0": None,
    "skip-verify": ("none", True),
    "preferred": ("none", False),
}


def _mysql_tls(query: dict[str, str | tuple[str, ...]]) -> TLS | None:
    """Take the TLS options of MySQL's DSN spellings out of ``query``:

    - Go's ``tls``: ``true`` (checked against the system's CAs, or ``ssl_ca``),
      ``skip-verify`` (not checked), ``preferred`` (only if the server offers it),
      ``false``; any other value names a configuration a Go program registered, which
      cannot travel in a DSN: it is taken as ``true``, with ``ssl_ca``, ``ssl_cert`` and
      ``ssl_key`` giving its files;
    - the MySQL clients' ``ssl-mode`` (``DISABLED`` ... ``VERIFY_IDENTITY``);
    - SQLAlchemy's ``ssl_ca``, ``ssl_cert``, ``ssl_key`` and ``ssl_check_hostname``
      (alone: checked when a CA is given, as PyMySQL does), and ``ssl=true``.
    """
    files = {
        field: value for field in ("ca", "cert", "key") if (value := _option(query, f"ssl_{field}"))
    }
    check_hostname = _option(query, "ssl_check_hostname")
    go = _option(query, "tls")
    mode = _option(query, "ssl-mode", "ssl_mode")
    switch = _option(query, "ssl")
    if sum(option is not None for option in (go, mode, switch)) > 1:
        raise DSNError("name TLS once: tls=, ssl-mode= or ssl=, not several")
    choice: tuple[Verify, bool] | None
    if go is not None:
        choice = _GO_TLS.get(go.lower(), ("full", True))  # a registered name: as "true"
    elif mode is not None:
        key = mode.lower().replace("-", "_")
        if key not in _MYSQL_MODES:
            raise DSNError(
                f"ssl-mode={mode!r}: use DISABLED, PREFERRED, REQUIRED, VERIFY_CA "
                "or VERIFY_IDENTITY"
            )
        choice = _MYSQL_MODES[key]
        if choice == ("none", True) and "ca" in files:
            choice = ("ca", True)  # as libpq's require: a CA given is a CA checked
    elif switch is not None:
        choice = None if switch.lower() in ("false", "0") else ("full", True)
    elif files:
        choice = ("full" if "ca" in files else "none"), True
    else:
        return None
    if choice is None:
        if files:
            raise DSNError("TLS is switched off and ssl_ca, ssl_cert or ssl_key given: drop one")
        return None
    verify, required = choice
    if verify == "full" and check_hostname is not None and check_hostname.lower() in ("false", "0"):
        verify = "ca"
    return TLS(verify, required, **files)


def _option(query: dict[str, str | tuple[str, ...]], *names: str) -> str | None:
    """Take the first of ``names`` given out of ``query`` (and the others with it); its
    value, the last one where it was given several times."""
    found = [query.pop(name) for name in names if name in query]
    if not found:
        return None
    value = found[0]
    return value[-1] if isinstance(value, tuple) else value


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
    return _mysql(url)
