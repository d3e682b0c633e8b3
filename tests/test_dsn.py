import pytest

from storage.dsn import DSNError, parse_dsn


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


def test_libpq_sslmode_is_passed_to_asyncpg_as_ssl() -> None:
    parsed = parse_dsn("postgres://u:p@h/db?sslmode=require")
    assert dict(parsed.url.query) == {"ssl": "require"}


def test_rendered_dsn_hides_the_password() -> None:
    assert "secret" not in parse_dsn("postgres://u:secret@h/db").rendered()


@pytest.mark.parametrize("dsn", ["", "oracle://u@h/db", "u:p@tcp(h:1)"])
def test_unusable_dsns_are_refused_with_a_reason(dsn: str) -> None:
    with pytest.raises(DSNError):
        parse_dsn(dsn)
