"""``python -m gateway`` (or ``mes-gateway``): serve the gateway with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from gateway.settings import ConfigError, Settings


def main() -> None:
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        sys.exit(f"mes-gateway: {error}")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # httpx logs each upstream request at INFO: a line per request on the hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=False,  # X-Forwarded-For is read by the gateway, from TRUSTED_PROXIES only
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )


if __name__ == "__main__":
    main()
