import pytest

from gateway.settings import ConfigError, Settings


def test_defaults_need_no_environment_and_put_history_in_a_local_sqlite_file() -> None:
    settings = Settings.from_env({})
    assert settings.upstream_base_url == "https://api.openai.com/v1"
    assert settings.history_dsn == settings.main_dsn == "mes_gateway.db"
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert not settings.managed_mode


def test_history_falls_back_to_the_main_database() -> None:
    settings = Settings.from_env({"SQL_DSN": "postgres://u@h/main"})
    assert settings.history_dsn == "postgres://u@h/main"
    settings = Settings.from_env({"SQL_DSN": "a.db", "MES_SQL_DSN": "b.db"})
    assert (settings.main_dsn, settings.history_dsn) == ("a.db", "b.db")


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings.from_env(
        {
            "UPSTREAM_API_KEY": "sk-upstream-secret",
            "GATEWAY_KEYS": "gw-secret",
            "SQL_DSN": "postgres://u:dbpass@h/db",
            "GATEWAY_ADMIN_KEY": "admin-secret",
            "MES_QUEUE": "redis://:redispass@h:6379/0",
        }
    )
    text = repr(settings)
    for secret in ("sk-upstream-secret", "gw-secret", "dbpass", "admin-secret", "redispass"):
        assert secret not in text


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"MES_DAILY_PARTITION": "maybe"}, "MES_DAILY_PARTITION"),
        ({"MES_RETENTION_DAYS": "-1"}, "MES_RETENTION_DAYS"),
        ({"TRUSTED_PROXIES": "not-an-ip"}, "TRUSTED_PROXIES"),
        ({"UPSTREAM_API_KEY": "sk-x"}, "GATEWAY_KEYS"),
        ({"UPSTREAM_BASE_URL": "ftp://x"}, "UPSTREAM_BASE_URL"),
        ({"MES_FLUSH_INTERVAL": "0"}, "MES_FLUSH_INTERVAL"),
        ({"MES_QUEUE": "http://redis:6379"}, "MES_QUEUE"),
        ({"MES_QUEUE": "redis://r:6379/0?decode_responses=true"}, "MES_QUEUE"),
        ({"MES_QUEUE_CLAIM_SECONDS": "0.5"}, "MES_QUEUE_CLAIM_SECONDS"),
        ({"MES_WRITER_NICE": "20"}, "MES_WRITER_NICE"),
        ({"MES_WRITER_NICE": "-1"}, "MES_WRITER_NICE"),
    ],
)
def test_a_misconfiguration_fails_with_a_sentence_naming_the_variable(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(environ)
