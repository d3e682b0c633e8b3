"""Running the fake upstream for tests (a thread) and benchmarks (a process)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from fake_upstream.app import create_app


@dataclass(frozen=True)
class Served:
    port: int

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root + "/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"fake upstream did not listen on {port} within {timeout} s")


@contextmanager
def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    behaviour: dict[str, str] | None = None,
    models: list[str] | None = None,
) -> Iterator[Served]:
    """The fake upstream under uvicorn in a background thread (``behaviour`` and ``models``:
    see ``fake_upstream.app``)."""
    port = port or free_port()
    config = uvicorn.Config(
        create_app(behaviour, models),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="critical",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-upstream", daemon=True)
    thread.start()
    try:
        _wait_until_listening(port)
        yield Served(port)
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serve_subprocess(host: str = "127.0.0.1", port: int = 0) -> Iterator[Served]:
    """The fake upstream in its own process (``python -m fake_upstream``), for benchmarks."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fake_upstream", "--host", host, "--port", str(port)]
    )
    try:
        _wait_until_listening(port)
        yield Served(port)
    finally:
        process.terminate()
        process.wait(10)
