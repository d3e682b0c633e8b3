"""``python -m gateway`` (or ``mes-gateway``): serve the gateway with uvicorn, or, with
``migrate``, apply the database migrations and exit. Everything else comes from the
environment (see the README)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import uvicorn

from gateway.settings import VARIABLES, ConfigError, Settings
from storage import logs


def _version() -> str:
    try:
        return version("mes-gateway")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="MES Gateway: an OpenAI-compatible proxy that records every conversation. "
        "Configured by environment variables (see the README).",
        epilog=_variables(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mes-gateway {_version()}")
    parser.add_argument(
        "command",
        nargs="?",
        choices=("serve", "migrate", "writer", "import"),
        default="serve",
        help="serve (the default): run the gateway; migrate: create and upgrade the main and "
        "history databases' schemas, then exit; writer: write the records gateways add to "
        "the Redis stream MES_QUEUE names; import FILE...: load exports and archives "
        "(.jsonl, .json, .jsonl.gz) into the history database, idempotently",
    )
    parser.add_argument("files", nargs="*", type=Path, help="import: the files to load")
    arguments = parser.parse_args(argv)
    if arguments.command == "import" and not arguments.files:
        parser.error("import needs at least one FILE")
    if arguments.command != "import" and arguments.files:
        parser.error(f"{arguments.command} takes no FILE")
    return arguments


def _variables() -> str:
    lines = ["environment variables (default):"]
    for variable in VARIABLES:
        default = getattr(Settings, variable.field)
        plain = isinstance(default, str | int | float) and default != ""
        shown = (
            f" ({default:g})" if isinstance(default, float) else f" ({default})" if plain else ""
        )
        lines.append(f"  {variable.name:<27} {variable.doc}{shown}")
    return "\n".join(lines)


async def _migrate(settings: Settings) -> None:
    from storage.database import create_engine, ensure_database, migrate

    for target, dsn in (("main", settings.main_dsn), ("history", settings.history_dsn)):
        database = await ensure_database(dsn, settings.db_connect_timeout)
        engine = create_engine(database, pool_size=1, connect_timeout=settings.db_connect_timeout)
        try:
            await migrate(engine, target)
        finally:
            await engine.dispose()
        logging.getLogger("mes.migrate").info("%s database is at its newest schema", target)


def _write(settings: Settings) -> None:
    import uvloop

    from gateway import queue_writer

    try:
        uvloop.run(queue_writer.run(settings))
    except ConfigError as error:
        sys.exit(f"mes-gateway writer: {error}")


def main(argv: list[str] | None = None) -> None:
    arguments = _arguments(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        sys.exit(f"mes-gateway: {error}")
    logs.configure(settings.log_level, settings.log_format)
    if arguments.command == "migrate":
        asyncio.run(_migrate(settings))
        return
    if arguments.command == "writer":
        _write(settings)
        return
    if arguments.command == "import":
        from gateway import import_command

        sys.exit(asyncio.run(import_command.run(settings, arguments.files)))
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        log_config=logs.config(settings.log_level, settings.log_format),  # in every worker
        access_log=False,
        proxy_headers=False,  # X-Forwarded-For is read by the gateway, from TRUSTED_PROXIES only
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )


if __name__ == "__main__":
    main()
