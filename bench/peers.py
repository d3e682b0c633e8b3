"""MES Gateway against its peers, each in front of the same fake upstream, in one run.

    python bench/peers.py                         # ~12 minutes, and the peers' install once
    python bench/peers.py --peers portkey --concurrency 1 16 --duration 5

The peers are installed once, pinned, into ``~/.cache/mes-gateway/bench-peers`` (or
``--cache``): LiteLLM's proxy into a virtualenv of its own, with pip; Portkey's gateway with
npm. Then the fake upstream starts (its own process), and beside it, each on its own port:

- MES Gateway, one worker, capturing every conversation into PostgreSQL (a throwaway
  server, durable settings), as issue 6's targets are set;
- MES Gateway, one worker, capture off (``MES_CAPTURE=false``): the proxy alone;
- LiteLLM's proxy, one worker, no database: it stores nothing;
- Portkey's gateway (Node), as ``npx @portkey-ai/gateway --headless`` starts it (no log
  console): it stores nothing.

Each answers one request, checked to be the fake upstream's answer, before any load. Then,
for each cell (non-streamed and streamed, ~1 KB prompt, each concurrency), wrk runs against
the direct upstream and then against one gateway, pair after pair, so that each gateway's
figures sit beside a baseline measured a moment before on the same machine. Prints one
table, then each gateway's resident memory at the end. Every process shares this machine's
cores: read the ratios and the added latency, not the absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.speed import (  # noqa: E402
    WrkRun,
    bench_settings,
    drained,
    history_database,
    prompt_body,
    rss_mib,
    writer_rss_mib,
    wrk,
)
from fake_upstream.testing import serve_subprocess  # noqa: E402
from tests.gateway_process import GatewayProcess, free_port  # noqa: E402

LITELLM = "litellm[proxy]==1.79.3"
PORTKEY = "@portkey-ai/gateway@1.15.2"
MODEL = "gpt-4o-mini"  # what bench/speed.py's bodies ask for


@dataclass
class Target:
    """A gateway in front of the fake upstream: where to send the load, and how."""

    name: str
    url: str  # the chat completions URL
    pid: int
    headers: dict[str, str] = field(default_factory=dict)
    gateway: GatewayProcess | None = None  # ours: drained before each run

    def rss_mib(self) -> float:
        """Resident memory now: the process and its children (a writer, a worker)."""
        return rss_mib(self.pid)[0] + writer_rss_mib(self.pid)


# -- the peers, installed once ----------------------------------------------------------


def install_litellm(cache: Path) -> Path:
    """LiteLLM's proxy in a virtualenv of its own (its pins are not ours): its CLI."""
    venv = cache / ("litellm-" + LITELLM.split("==")[1])
    cli = venv / "bin" / "litellm"
    if not cli.exists():
        print(f"installing {LITELLM} into {venv} (pip)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, LITELLM], check=True)
    return cli


def install_portkey(cache: Path) -> Path:
    """Portkey's gateway from npm: the script ``npx @portkey-ai/gateway`` runs."""
    prefix = cache / ("portkey-" + PORTKEY.rsplit("@", 1)[1])
    package = prefix / "node_modules" / "@portkey-ai" / "gateway"
    if not package.exists():
        print(f"installing {PORTKEY} into {prefix} (npm)", flush=True)
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", PORTKEY],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    bin_field = json.loads((package / "package.json").read_text())["bin"]
    script = bin_field if isinstance(bin_field, str) else next(iter(bin_field.values()))
    return package / script


# -- starting each gateway ----------------------------------------------------------------


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{url} exited at start:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    sys.exit(f"{url} did not start within {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def started(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def litellm(cli: Path, upstream_base: str, workdir: Path) -> Iterator[Target]:
    port = free_port()
    config = workdir / "litellm.yaml"
    # JSON is YAML: the model the load asks for, sent on to the fake upstream.
    model = {"model": "openai/" + MODEL, "api_base": upstream_base, "api_key": "sk-bench"}
    config.write_text(json.dumps({"model_list": [{"model_name": MODEL, "litellm_params": model}]}))
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of its price list from GitHub
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
    }
    command = [str(cli), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--num_workers", "1"]
    log = workdir / "litellm.log"
    with started(command, env, log) as process:
        wait_until_up(f"http://127.0.0.1:{port}/health/liveliness", process, log, 180)
        yield Target("LiteLLM proxy", f"http://127.0.0.1:{port}/v1/chat/completions", process.pid)


@contextmanager
def portkey(script: Path, upstream_base: str, workdir: Path) -> Iterator[Target]:
    port = free_port()
    log = workdir / "portkey.log"
    command = ["node", str(script), f"--port={port}", "--headless"]  # no log console
    with started(command, dict(os.environ), log) as process:
        wait_until_up(f"http://127.0.0.1:{port}/", process, log, 60)
        headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": upstream_base}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        yield Target("Portkey gateway", url, process.pid, headers)


@contextmanager
def ours(kind: str, upstream_base: str, workdir: Path) -> Iterator[Target]:
    folder = workdir / kind
    with history_database(kind, folder) as env:
        with GatewayProcess(bench_settings(upstream_base, folder, env), folder) as gateway:
            assert gateway.process is not None
            name = "MES, capture off" if kind == "off" else f"MES, capture into {kind}"
            url = gateway.url + "/v1/chat/completions"
            yield Target(name, url, gateway.process.pid, gateway=gateway)


def check(target: Target, body: bytes) -> None:
    """One request through ``target``: the fake upstream's answer, or the run stops here."""
    answer = httpx.post(
        target.url,
        content=body.replace(b"@@N@@", b"check"),
        headers={
            "Authorization": "Bearer sk-bench",
            "Content-Type": "application/json",
            **target.headers,
        },
        timeout=30,
    )
    if answer.status_code != 200 or answer.json().get("object") != "chat.completion":
        reason = f"{answer.status_code} {answer.text[:300]}"
        sys.exit(f"{target.name} did not relay the fake upstream's answer: {reason}")


# -- the run --------------------------------------------------------------------------------

HEADER = (
    f"{'gateway':<30}{'mode':<7}{'conc':>5}{'direct rps':>11}{'gw rps':>8}{'ratio':>7}"
    f"{'direct p50':>11}{'gw p50':>9}{'added':>9}{'direct p99':>11}{'gw p99':>9}{'added':>9}"
    f"{'errors':>7}"
)


def row(target: Target, stream: bool, connections: int, direct: WrkRun, through: WrkRun) -> str:
    return (
        f"{target.name:<30}{'stream' if stream else 'whole':<7}{connections:>5}"
        f"{direct.requests_per_second:>11.0f}{through.requests_per_second:>8.0f}"
        f"{through.requests_per_second / direct.requests_per_second:>7.2f}"
        f"{direct.p50_ms:>11.2f}{through.p50_ms:>9.2f}{through.p50_ms - direct.p50_ms:>9.2f}"
        f"{direct.p99_ms:>11.2f}{through.p99_ms:>9.2f}{through.p99_ms - direct.p99_ms:>9.2f}"
        f"{direct.errors + through.errors:>7}"
        + (
            "  most answers were errors: not comparable"
            if 2 * through.errors > through.requests
            else ""
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peers", nargs="*", default=["litellm", "portkey"], choices=["litellm", "portkey"]
    )
    parser.add_argument(
        "--ours", nargs="*", default=["postgresql", "off"], choices=["postgresql", "sqlite", "off"]
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "mes-gateway" / "bench-peers"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    if "portkey" in args.peers and shutil.which("npm") is None:
        sys.exit("Portkey's gateway needs Node.js and npm")
    installed = {
        "litellm": install_litellm(args.cache) if "litellm" in args.peers else None,
        "portkey": install_portkey(args.cache) if "portkey" in args.peers else None,
    }

    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-peers-"))
    workdir.chmod(0o755)  # the database server runs as its own user
    bodies = {}
    for stream in (False, True):
        bodies[stream] = workdir / f"body-{'stream' if stream else 'whole'}.json"
        bodies[stream].write_bytes(prompt_body(1000, stream))

    with serve_subprocess() as upstream, ExitStack() as stack:
        base = upstream.base_url
        direct_url = base + "/chat/completions"
        targets = [stack.enter_context(ours(kind, base, workdir)) for kind in args.ours]
        if installed["litellm"] is not None:
            targets.append(stack.enter_context(litellm(installed["litellm"], base, workdir)))
        if installed["portkey"] is not None:
            targets.append(stack.enter_context(portkey(installed["portkey"], base, workdir)))
        for target in targets:
            check(target, bodies[False].read_bytes())
            wrk(target.url, bodies[False], 16, 2, target.headers)  # warm up
        print("\nwrk, closed loop, ~1 KB prompt, each gateway right after the direct upstream; ms")
        print(HEADER, flush=True)
        for stream in (False, True):
            for connections in args.concurrency:
                for target in targets:
                    if target.gateway is not None:
                        drained(target.gateway)  # the last run's backlog written first
                    direct = wrk(direct_url, bodies[stream], connections, args.duration)
                    through = wrk(
                        target.url, bodies[stream], connections, args.duration, target.headers
                    )
                    print(row(target, stream, connections, direct, through), flush=True)
        print("\nresident memory at the end (with child processes):")
        for target in targets:
            print(f"  {target.name:<30}{target.rss_mib():>8.1f} MiB")
    print(f"\npeers: {LITELLM}, {PORTKEY}; logs in {workdir}")


if __name__ == "__main__":
    main()
