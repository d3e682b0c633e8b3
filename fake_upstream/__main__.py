"""``python -m fake_upstream --port 9000``: the fake OpenAI upstream on its own."""

from __future__ import annotations

import argparse

import uvicorn

from fake_upstream.app import create_app


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    arguments = parser.parse_args()
    uvicorn.run(
        create_app(),
        host=arguments.host,
        port=arguments.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
