"""The gateway as users run it: ``python -m gateway`` in a subprocess, on 127.0.0.1."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port free now, below the range the kernel picks outgoing connections' ports from:
    a server restarted on its port (a database after an outage) cannot find it taken by a
    client's connection meanwhile, as a port the kernel chose (from that range) could be."""
    try:
        lowest = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lowest = 0
    for _ in range(100):
        port = random.randrange(10_000, lowest) if lowest > 11_000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
            if chosen not in _GIVEN:
                _GIVEN.add(chosen)
                return chosen
    raise RuntimeError("no free port found")


_GIVEN: set[int] = set()  # ports this process has handed out: not handed out twice


class GatewayProcess:
    """Starts the gateway with ``env`` (on top of a minimal environment) in ``workdir``."""

    def __init__(
        self, env: dict[str, str], workdir: Path, repo: Path = REPO, *, set_up: bool = True
    ) -> None:
        self.set_up = set_up  # start() waits for the databases (or word that one is down)
        self.port = int(env.get("PORT") or free_port())
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/root"),
            "PYTHONPATH": str(repo),  # another checkout's gateway, for bench/ab.py
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "MES_FLUSH_INTERVAL": "0.05",
            **env,
        }
        self.workdir = workdir
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway"],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited at start:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self._set_up(deadline) if self.set_up else self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway did not start within {timeout} s:\n{self.log()}")

    def _set_up(self, deadline: float) -> GatewayProcess:
        """Wait until the gateway's databases are set up (it serves before, within a second
        of its start, whatever their state), or it says that one is down."""
        while time.monotonic() < deadline and "database not ready" not in self.log():
            try:
                if httpx.get(self.url + "/readyz", timeout=5.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> GatewayProcess:
        if self.process is not None and self.process.poll() is None:  # started already
            return self
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def until(check: Any, timeout: float = 90.0, tolerating: tuple[type[Exception], ...] = ()) -> Any:
    """Poll ``check()`` until it returns something true; that value. An exception of
    ``tolerating`` (a server not answering yet, say) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except tolerating:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s: {check}")
