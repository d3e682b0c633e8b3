"""``python -m fake_upstream --port 9000``: the fake OpenAI upstream on its own."""

from __future__ import annotations

import argparse

import uvicorn

from fake_upstream.app import create_app


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--behave",
        action="append",
        default=[],
        metavar="X-FAKE-HEADER=VALUE",
        help="act on this header for every request that does not send it (repeatable)",
    )
    parser.add_argument("--models", help="comma-separated models GET /v1/models lists")
    arguments = parser.parse_args()
    behaviour = dict(item.split("=", 1) for item in arguments.behave)
    models = arguments.models.split(",") if arguments.models else None
    uvicorn.run(
        create_app(behaviour, models),
        host=arguments.host,
        port=arguments.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
