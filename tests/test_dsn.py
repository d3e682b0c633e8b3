import pytest

from storage.dsn import TLS, DSNError, parse_dsn


@pytest.mark.parametrize(
    ("dsn", "kind", "expected"),
    [
        (
            "root:123456@tcp(localhost:3306)/oneapi_messages",
            "mysql",
            "mysql+aiomysql://root:123456@localhost:3306/oneapi_messages?charset=utf8mb4",
        ),
        (
            "postgres://user:password@localhost:5432/oneapi_messages",
            "postgresql",
            "postgresql+asyncpg://user:password@localhost:5432/oneapi_messages",
        ),
        ("postgresql://u:p@db/x", "postgresql", "postgresql+asyncpg://u:p@db/x"),
        ("postgresql+asyncpg://u@db/x", "postgresql", "postgresql+asyncpg://u@db/x"),
        ("mysql://u:p@db:3307/x", "mysql", "mysql+aiomysql://u:p@db:3307/x?charset=utf8mb4"),
        ("history.db", "sqlite", "sqlite+aiosqlite:///history.db"),
        ("/var/lib/mes/h.sqlite", "sqlite", "sqlite+aiosqlite:////var/lib/mes/h.sqlite"),
        ("sqlite:///x.db", "sqlite", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_every_accepted_form_becomes_an_async_sqlalchemy_url(
    dsn: str, kind: str, expected: str
) -> None:
    parsed = parse_dsn(dsn)
    assert parsed.kind == kind
    assert parsed.url.render_as_string(hide_password=False) == expected


def test_go_dsn_keeps_a_password_with_at_signs_and_drops_go_only_options() -> None:
    parsed = parse_dsn(
        "app:p@ss@word@tcp(10.0.0.5:3307)/logs?charset=utf8mb4&parseTime=True&loc=Local"
    )
    assert parsed.url.username == "app"
    assert parsed.url.password == "p@ss@word"
    assert (parsed.url.host, parsed.url.port, parsed.url.database) == ("10.0.0.5", 3307, "logs")
    assert dict(parsed.url.query) == {"charset": "utf8mb4"}


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
def test_libpq_modes_asyncpg_knows_are_passed_as_its_ssl(mode: str) -> None:
    parsed = parse_dsn(f"postgres://u:p@h/db?sslmode={mode}")
    assert dict(parsed.url.query) == {"ssl": mode} and parsed.tls is None


@pytest.mark.parametrize(
    ("dsn", "tls"),
    [
        ("postgres://u@h/db?sslmode=require", TLS("none")),
        ("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem", TLS("ca", ca="/ca.pem")),
        ("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/ca.pem", TLS("ca", ca="/ca.pem")),
        (
            "postgresql://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem"
            "&sslkey=/c.key&sslpassword=pw",
            TLS("full", ca="/ca.pem", cert="/c.pem", key="/c.key", key_password="pw"),
        ),
        ("postgresql://u@h/db?ssl=true", TLS("full")),
        ("u:p@tcp(h:3306)/db?tls=true", TLS("full")),
        ("u:p@tcp(h:3306)/db?tls=skip-verify&parseTime=true", TLS("none")),
        ("u:p@tcp(h:3306)/db?tls=preferred", TLS("none", required=False)),
        ("u:p@tcp(h:3306)/db?tls=corp&ssl_ca=/ca.pem", TLS("full", ca="/ca.pem")),
        ("mysql://u@h/db?ssl-mode=REQUIRED", TLS("none")),
        ("mysql://u@h/db?ssl_mode=required&ssl_ca=/ca.pem", TLS("ca", ca="/ca.pem")),
        ("mysql://u@h/db?ssl-mode=VERIFY_CA&ssl_ca=/ca.pem", TLS("ca", ca="/ca.pem")),
        ("mysql://u@h/db?ssl-mode=verify_identity", TLS("full")),
        ("mysql://u@h/db?ssl-mode=PREFERRED", TLS("none", required=False)),
        ("mysql://u@h/db?ssl_ca=/ca.pem", TLS("full", ca="/ca.pem")),
        ("mysql://u@h/db?ssl_ca=/ca.pem&ssl_check_hostname=false", TLS("ca", ca="/ca.pem")),
        ("mysql://u@h/db?ssl_cert=/c.pem&ssl_key=/c.key", TLS("none", cert="/c.pem", key="/c.key")),
        ("mysql://u@h/db?ssl=true", TLS("full")),
    ],
)
def test_every_tls_spelling_becomes_one_tls_and_leaves_the_query(dsn: str, tls: TLS) -> None:
    parsed = parse_dsn(dsn)
    assert parsed.tls == tls
    assert set(parsed.url.query) <= {"charset"}  # nothing left for the driver to stumble on


@pytest.mark.parametrize(
    "dsn",
    ["u:p@tcp(h:3306)/db?tls=false", "mysql://u@h/db?ssl-mode=DISABLED", "mysql://u@h/db?ssl=0"],
)
def test_mysql_tls_switched_off_is_no_tls(dsn: str) -> None:
    assert parse_dsn(dsn).tls is None


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("postgres://u@h/db?sslrootcert=/ca.pem", "sslrootcert take effect with sslmode"),
        ("postgres://u@h/db?sslmode=prefer&sslcert=/c.pem", "sslcert take effect"),
        ("postgres://u@h/db?sslmode=sometimes", "sslmode='sometimes'"),
        ("mysql://u@h/db?ssl-mode=sometimes", "ssl-mode='sometimes'"),
        ("u:p@tcp(h:3306)/db?tls=false&ssl_ca=/ca.pem", "drop one"),
        ("mysql://u@h/db?tls=true&ssl-mode=REQUIRED", "name TLS once"),
    ],
)
def test_tls_options_that_contradict_are_refused_with_a_reason(dsn: str, reason: str) -> None:
    with pytest.raises(DSNError, match=reason):
        parse_dsn(dsn)


def test_rendered_dsn_hides_the_password() -> None:
    assert "secret" not in parse_dsn("postgres://u:secret@h/db").rendered()


@pytest.mark.parametrize("dsn", ["", "oracle://u@h/db", "u:p@tcp(h:1)"])
def test_unusable_dsns_are_refused_with_a_reason(dsn: str) -> None:
    with pytest.raises(DSNError):
        parse_dsn(dsn)
