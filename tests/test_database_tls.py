"""TLS to the databases, in every DSN spelling the docs name, against a PostgreSQL and a
MariaDB that refuse TCP without it, with certificates from a CA made for the test."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from sqlalchemy import text

from storage.database import create_engine, ensure_database
from storage.dsn import parse_dsn
from tests.conftest import unavailable
from tests.dbservers import MYSQL_PASSWORD, DatabaseServer, ServerTLS, start_mariadb, start_postgres
from tests.managed import ADMIN, managed_gateway, new_member

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "over TLS"}]}


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA that issued the server's and the client's certificates
    other_ca: Path  # a CA that issued nothing here
    client_cert: Path  # for the user "certuser"
    client_key: Path


@pytest.fixture(scope="module")
def certificates() -> Iterator[Certificates]:
    folder = Path(tempfile.mkdtemp(prefix="mes-test-tls-"))
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")  # not "localhost": connecting by that name fails
    client = ca.issue_cert("certuser", common_name="certuser")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(folder / "other-ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    (folder / "server.key").chmod(0o600)
    yield Certificates(
        folder / "ca.pem", folder / "other-ca.pem", folder / "client.pem", folder / "client.key"
    )


@pytest.fixture(scope="module")
def tls_servers(certificates: Certificates) -> Iterator[dict[str, DatabaseServer]]:
    tls = ServerTLS(
        certificates.ca.parent / "server.pem",
        certificates.ca.parent / "server.key",
        certificates.ca,
    )
    servers: dict[str, DatabaseServer] = {}
    try:
        for kind, start in (("postgresql", start_postgres), ("mysql", start_mariadb)):
            base = Path(tempfile.mkdtemp(prefix=f"mes-test-tls-{kind}-"))
            servers[kind] = start(base, tls=tls)
    except Exception as error:  # binaries missing, or a server would not start
        for server in servers.values():
            server.shutdown()
        unavailable(f"a TLS database server would not start: {error}")
    servers["postgresql"].sql("CREATE ROLE certuser LOGIN SUPERUSER")
    servers["mysql"].sql(
        "CREATE USER 'certuser'@'127.0.0.1' REQUIRE X509; "
        "GRANT ALL ON *.* TO 'certuser'@'127.0.0.1'"
    )
    yield servers
    for server in servers.values():
        server.shutdown()


def dsn(kind: str, server: DatabaseServer, form: str, files: Certificates) -> str:
    """``form`` with the server's address, a new database's name and the files filled in."""
    return form.format(
        port=server.port,
        password=MYSQL_PASSWORD,
        db=server.new_database_name("tls"),
        ca=files.ca,
        other_ca=files.other_ca,
        cert=files.client_cert,
        key=files.client_key,
    )


async def encrypted(database_dsn: str) -> bool:
    """Create the DSN's database, connect to it, and ask the server whether it is TLS."""
    database = await ensure_database(database_dsn)
    engine = create_engine(database, pool_size=1)
    try:
        async with engine.connect() as connection:
            if database.kind == "postgresql":
                found = await connection.scalar(
                    text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                )
                return bool(found)
            row = (await connection.execute(text("SHOW SESSION STATUS LIKE 'Ssl_cipher'"))).one()
            return bool(row[1])
    finally:
        await engine.dispose()


ACCEPTED = {
    "postgresql": [
        # libpq's own spelling, checked all the way
        "postgresql://postgres@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={ca}",
        # New API's Go DSN form, encrypted without a check
        "postgres://postgres@127.0.0.1:{port}/{db}?sslmode=require",
        # the certificate checked, not the name
        "postgresql://postgres@localhost:{port}/{db}?sslmode=verify-ca&sslrootcert={ca}",
        # a user the server authenticates by its client certificate alone
        "postgresql://certuser@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={ca}"
        "&sslcert={cert}&sslkey={key}",
    ],
    "mysql": [
        # New API's Go DSNs: no check, and a registered configuration given its CA
        "mes:{password}@tcp(127.0.0.1:{port})/{db}?charset=utf8mb4&parseTime=True&tls=skip-verify",
        "mes:{password}@tcp(127.0.0.1:{port})/{db}?tls=custom&ssl_ca={ca}",
        # the MySQL clients' ssl-mode
        "mysql://mes:{password}@127.0.0.1:{port}/{db}?ssl-mode=VERIFY_IDENTITY&ssl_ca={ca}",
        "mysql://mes:{password}@localhost:{port}/{db}?ssl-mode=VERIFY_CA&ssl_ca={ca}",
        # SQLAlchemy's and PyMySQL's: a CA given is checked, name included
        "mysql+aiomysql://mes:{password}@127.0.0.1:{port}/{db}?ssl_ca={ca}",
        # a user the server lets in only with a client certificate
        "mysql://certuser@127.0.0.1:{port}/{db}?ssl_ca={ca}&ssl_cert={cert}&ssl_key={key}",
    ],
}

REFUSED = {
    "postgresql": [
        ("postgresql://postgres@127.0.0.1:{port}/{db}?sslmode=disable", "no encryption"),
        (
            "postgresql://postgres@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={other_ca}",
            "certificate verify failed",
        ),
        (
            "postgresql://postgres@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={ca}",
            "match",  # the certificate names 127.0.0.1, not localhost
        ),
        (
            "postgresql://certuser@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={ca}",
            "certificate",  # no client certificate
        ),
    ],
    "mysql": [
        # MariaDB's word for a connection require_secure_transport turns away
        ("mes:{password}@tcp(127.0.0.1:{port})/{db}", "Access denied"),
        ("mes:{password}@tcp(127.0.0.1:{port})/{db}?tls=true", "certificate verify failed"),
        (
            "mysql://mes:{password}@127.0.0.1:{port}/{db}?ssl-mode=VERIFY_CA&ssl_ca={other_ca}",
            "certificate verify failed",
        ),
        (
            "mysql://mes:{password}@localhost:{port}/{db}?ssl-mode=VERIFY_IDENTITY&ssl_ca={ca}",
            "match",
        ),
        ("mysql://certuser@127.0.0.1:{port}/{db}?ssl_ca={ca}", "Access denied"),
    ],
}


@pytest.mark.parametrize(
    ("kind", "form"), [(kind, form) for kind, forms in ACCEPTED.items() for form in forms]
)
async def test_each_tls_spelling_connects_encrypted(
    kind: str, form: str, tls_servers: dict[str, DatabaseServer], certificates: Certificates
) -> None:
    assert await encrypted(dsn(kind, tls_servers[kind], form, certificates))


@pytest.mark.parametrize(
    ("kind", "form", "reason"),
    [(kind, form, reason) for kind, cases in REFUSED.items() for form, reason in cases],
)
async def test_what_tls_forbids_is_refused(
    kind: str,
    form: str,
    reason: str,
    tls_servers: dict[str, DatabaseServer],
    certificates: Certificates,
) -> None:
    with pytest.raises(Exception) as refused:
        await encrypted(dsn(kind, tls_servers[kind], form, certificates))
    assert reason.lower() in said(refused.value).lower()


def said(error: BaseException | None) -> str:
    """What an error and its causes say: aiomysql's "Can't connect" hides the SSL error."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return " / ".join(messages)


@pytest.mark.parametrize(
    ("kind", "form"),
    [
        ("postgresql", "postgresql://postgres@127.0.0.1:{port}/{db}?sslmode=require"),
        ("mysql", "mes:{password}@tcp(127.0.0.1:{port})/{db}?tls=skip-verify"),
        ("mysql", "mysql://mes:{password}@127.0.0.1:{port}/{db}?ssl-mode=REQUIRED"),
    ],
)
async def test_a_server_without_tls_is_refused_where_the_dsn_requires_it(
    kind: str, form: str, request: pytest.FixtureRequest, certificates: Certificates
) -> None:
    # The session's servers, which offer no TLS. aiomysql would go on in plain text.
    plain: DatabaseServer = request.getfixturevalue(
        "postgres" if kind == "postgresql" else "mariadb"
    )
    with pytest.raises(Exception, match="(?i)(rejected SSL upgrade|offers no TLS)"):
        await encrypted(dsn(kind, plain, form, certificates))


def test_a_missing_certificate_file_is_named_at_start(tmp_path: Path) -> None:
    database = parse_dsn(
        f"postgresql://u@127.0.0.1/x?sslmode=verify-full&sslrootcert={tmp_path / 'ca.pem'}"
    )
    with pytest.raises(Exception, match="ca.pem"):
        create_engine(database)


def test_the_gateway_keeps_history_over_tls(
    upstream: Any,
    tls_servers: dict[str, DatabaseServer],
    certificates: Certificates,
    tmp_path: Path,
) -> None:
    main = dsn(
        "postgresql",
        tls_servers["postgresql"],
        ACCEPTED["postgresql"][0],
        certificates,
    )
    history = dsn("mysql", tls_servers["mysql"], ACCEPTED["mysql"][1], certificates)
    with managed_gateway(upstream, main, tmp_path, MES_SQL_DSN=history) as gateway:
        member = new_member(gateway, "tls")
        answer = httpx.post(
            gateway.base_url + "/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {member.key}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 60
        stored: list[dict[str, Any]] = []
        while not stored and time.monotonic() < deadline:
            stored = httpx.get(gateway.url + "/admin/completions", headers=ADMIN).json()["data"]
            time.sleep(0.05)
    assert [row["response_id"] for row in stored] == [answer.json()["id"]]
    assert stored[0]["user_id"] == member.user_id
