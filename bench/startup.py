"""How long the gateway takes from its start to its first answer, by the state of its
database: SQLite new and existing, PostgreSQL refusing connections (nothing on its port),
and PostgreSQL hanging (a port that accepts and never answers).

    python bench/startup.py --runs 5
    python bench/startup.py --runs 3 --repo /tmp/before   # another checkout's gateway

Prints the median and range of the seconds from the process's start to ``/healthz``
answering 200, and to a chat completion answered through it. The fake upstream runs in
this process's thread; each run is a fresh gateway process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gateway_process import REPO, GatewayProcess, free_port  # noqa: E402
from tests.test_startup import silent_server  # noqa: E402

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def first_answers(env: dict[str, str], folder: Path, repo: Path) -> tuple[float, float]:
    gateway = GatewayProcess(env, folder, repo, set_up=False)
    began = time.monotonic()
    with gateway.start(timeout=120):
        healthy = time.monotonic() - began
        answer = httpx.post(gateway.base_url + "/chat/completions", json=CHAT, timeout=30)
        answered = time.monotonic() - began
        assert answer.status_code == 200, answer.text
    return healthy, answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to start")
    args = parser.parse_args()
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "fake_upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        upstream = {"UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"}
        with silent_server() as silent, tempfile.TemporaryDirectory() as tmp:
            kept = Path(tmp) / "kept.db"
            cases = {
                "SQLite, a new file": lambda n: {"MES_SQLITE_PATH": str(Path(tmp) / f"{n}.db")},
                "SQLite, existing": lambda n: {"MES_SQLITE_PATH": str(kept)},
                "PostgreSQL refusing": lambda n: {
                    "SQL_DSN": f"postgresql://mes@127.0.0.1:{free_port()}/mes"
                },
                "PostgreSQL hanging": lambda n: {
                    "SQL_DSN": f"postgresql://mes@127.0.0.1:{silent}/mes"
                },
            }
            print(f"{'database':<22} {'healthz (s)':>22} {'first answer (s)':>22}")
            for name, database in cases.items():
                times = [
                    first_answers({**upstream, **database(n)}, Path(tmp) / f"{name}-{n}", args.repo)
                    for n in range(args.runs)
                ]
                columns = []
                for values in zip(*times, strict=True):
                    columns.append(
                        f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
                    )
                print(f"{name:<22} {columns[0]:>22} {columns[1]:>22}")
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
