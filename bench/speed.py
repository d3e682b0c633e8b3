"""How fast the gateway is, against the direct upstream in the same run.

    python bench/speed.py                    # everything: ~25 minutes
    python bench/speed.py --configs postgresql off --duration 5 --soak 0

Starts the fake upstream (its own process) and, one after another, the gateway (one worker)
in each configuration: capture on into SQLite, capture on into PostgreSQL (a throwaway
server, durable settings), capture off (``MES_CAPTURE=false``); on demand, SQLite with
redaction patterns (``sqlite-redacting``) or with content capture off (``sqlite-no-content``),
where the gateway shapes and redacts each record before its spool. For each it runs:

- wrk (closed loop, keep-alive) for throughput and latency at concurrency 1, 16 and 64,
  non-streamed and streamed, with a ~1 KB prompt; and at concurrency 16 with 20 KB and
  200 KB prompts. Each gateway run follows a run of the same load against the direct
  upstream, so both see the same machine.
- the open-loop generator (``bench/openloop.py``) at fixed rates, for latency measured from
  the time each request was due, and for streams the time to first byte.
- a 60 s soak at concurrency 64 on a fresh gateway (the same database), after which its
  RSS is read, and its writer process's (the two added up for the target).

Every request is a new conversation (wrk's script numbers them), so capture writes a
conversation, a completion and two messages for each. Prints one table per configuration,
then the figures the issue's targets are about. The client, the gateway, the fake
upstream and the database share this machine's cores: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import openloop  # noqa: E402
from fake_upstream.testing import serve_subprocess  # noqa: E402
from tests.gateway_process import GatewayProcess  # noqa: E402

HERE = Path(__file__).resolve().parent
FILLER = (
    "The quarterly report shows revenue up four percent, churn down, and a backlog of "
    "support tickets about the export feature that the team wants to clear before June. "
)


def prompt_body(size: int, stream: bool) -> bytes:
    """A chat request of about ``size`` bytes, with ``@@N@@`` where the counter goes."""
    text = (FILLER * (size // len(FILLER) + 1))[: max(size - 200, 10)]
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Question @@N@@: summarise this. " + text},
        ],
        "stream": stream,
    }
    return json.dumps(body).encode()


# -- wrk ----------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


@dataclass
class WrkRun:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(
    url: str,
    body_file: Path,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> WrkRun:
    """wrk's run of ``chat.lua`` against ``url``; ``headers`` are sent beside its own."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",  # wrk's default, 2 s, would count a slow peer's answers as errors
        "--latency",
        "-s",
        str(HERE / "chat.lua"),
        url,
    ]
    env = {
        **os.environ,
        "MES_BENCH_BODY": str(body_file),
        "MES_BENCH_TAG": uuid.uuid4().hex,
        "MES_BENCH_HEADERS": "\n".join(
            f"{name}: {value}" for name, value in (headers or {}).items()
        ),
    }
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", out, re.M))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def percentile(name: str) -> float:
        if name not in percentiles:  # no answer in time, or an output this does not know
            print(f"wrk gave no {name}th percentile:\n{out}", file=sys.stderr)
            return float("nan")
        return _ms(percentiles[name])

    return WrkRun(
        requests_per_second=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=percentile("50"),
        p99_ms=percentile("99"),
        requests=int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        errors=errors + (int(non_2xx.group(1)) if non_2xx else 0),
    )


# -- open loop ----------------------------------------------------------------------------


@dataclass
class OpenRun:
    p50_ms: float
    p99_ms: float
    first_byte_p50_ms: float
    first_byte_p99_ms: float
    errors: int
    late: int


def raw_request(port: int, body: bytes) -> Callable[[int], bytes]:
    head, tail = body.split(b"@@N@@")
    tag = uuid.uuid4().hex.encode()

    def make(n: int) -> bytes:
        content = head + tag + b"-" + str(n).encode() + tail
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer sk-bench\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(content))
        ) + content

    return make


def open_loop(port: int, body: bytes, rate: float, seconds: float) -> OpenRun:
    result = asyncio.run(openloop.run("127.0.0.1", port, raw_request(port, body), rate, seconds))
    done = sorted(s.done * 1000 for s in result.samples)
    first = sorted(s.first_byte * 1000 for s in result.samples)
    return OpenRun(
        p50_ms=statistics.median(done),
        p99_ms=_p99(done),
        first_byte_p50_ms=statistics.median(first),
        first_byte_p99_ms=_p99(first),
        errors=result.errors + int(rate * seconds) - len(result.samples),
        late=result.late_sends,
    )


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


# -- the gateway under test -----------------------------------------------------------------


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of ``pid``, MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def writer_rss_mib(gateway_pid: int) -> float:
    """Resident memory of the gateway's writer process (its child), MiB; 0 with none."""
    children = Path(f"/proc/{gateway_pid}/task/{gateway_pid}/children").read_text().split()
    return sum(rss_mib(int(child))[0] for child in children)


def counters(gateway: GatewayProcess) -> dict[str, float]:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    return {m[0]: float(m[1]) for m in re.findall(r"^mes_(\w+) ([\d.e+-]+)$", text, re.M)}


def drained(gateway: GatewayProcess, timeout: float = 300.0) -> dict[str, float]:
    """The gateway's counters once its writer has written everything it captured (so that
    one measurement's backlog does not slow the next)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = counters(gateway)
        written = seen.get("records_written_total", 0) + seen.get("records_failed_total", 0)
        if written >= seen.get("records_captured_total", 0) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


# What an operator might keep out of the history: card numbers and other people's keys.
REDACTING = r'["\\b(?:\\d[ -]?){15}\\d\\b", "sk-[A-Za-z0-9_-]{20,}"]'


@contextmanager
def history_database(kind: str, workdir: Path) -> Iterator[dict[str, str]]:
    if kind == "sqlite":
        yield {"MES_SQLITE_PATH": str(workdir / "history.db")}
    elif kind == "sqlite-redacting":  # records shaped and redacted by the gateway
        yield {"MES_SQLITE_PATH": str(workdir / "history.db"), "MES_REDACT_PATTERNS": REDACTING}
    elif kind == "sqlite-no-content":
        yield {"MES_SQLITE_PATH": str(workdir / "history.db"), "MES_CAPTURE_CONTENT": "false"}
    elif kind == "off":
        yield {"MES_CAPTURE": "false", "MES_SQLITE_PATH": str(workdir / "main.db")}
    else:
        from tests.dbservers import start_postgres

        server = start_postgres(workdir / "pg", durable=True)
        try:
            yield {"SQL_DSN": server.url("mes_bench")}
        finally:
            server.shutdown()


def bench_settings(upstream_base: str, folder: Path, database: dict[str, str]) -> dict[str, str]:
    """The gateway's settings in a bench: ``database`` (from ``history_database``), its spool
    in ``folder``, warnings only in its log."""
    return {
        "UPSTREAM_BASE_URL": upstream_base,
        "LOG_LEVEL": "warning",
        "MES_SPOOL_DIR": str(folder / "spool"),
        "MES_FLUSH_INTERVAL": "0.2",
        **database,
    }


# -- the run --------------------------------------------------------------------------------

HEADER = (
    f"{'mode':<10}{'prompt':>7}{'conc':>5}{'direct rps':>11}{'gw rps':>8}{'ratio':>7}"
    f"{'direct p50':>11}{'gw p50':>8}{'added':>7}{'direct p99':>11}{'gw p99':>8}{'added':>7}"
    f"{'errors':>7}"
)


def closed_loop_table(
    upstream_url: str,
    gateway: GatewayProcess,
    bodies: dict[tuple[int, bool], Path],
    cells: list[tuple[bool, int, int]],
    seconds: float,
) -> list[dict[str, object]]:
    print("wrk, closed loop; latency in ms")
    print(HEADER)
    rows = []
    for stream, size, connections in cells:
        body = bodies[(size, stream)]
        drained(gateway)
        direct = wrk(upstream_url, body, connections, seconds)
        through = wrk(gateway.url + "/v1/chat/completions", body, connections, seconds)
        ratio = through.requests_per_second / direct.requests_per_second
        mode = "stream" if stream else "whole"
        print(
            f"{mode:<10}{size // 1000:>6}K{connections:>5}{direct.requests_per_second:>11.0f}"
            f"{through.requests_per_second:>8.0f}{ratio:>7.2f}{direct.p50_ms:>11.2f}"
            f"{through.p50_ms:>8.2f}{through.p50_ms - direct.p50_ms:>7.2f}{direct.p99_ms:>11.2f}"
            f"{through.p99_ms:>8.2f}{through.p99_ms - direct.p99_ms:>7.2f}"
            f"{direct.errors + through.errors:>7}",
            flush=True,
        )
        rows.append(
            {
                "stream": stream,
                "size": size,
                "connections": connections,
                "direct": direct,
                "gateway": through,
            }
        )
    return rows


def open_loop_table(
    upstream_port: int, gateway: GatewayProcess, rates: list[float], seconds: float
) -> list[dict[str, object]]:
    print("open loop (latency from the time each request was due), ms")
    print(
        f"{'mode':<10}{'rate':>6}{'direct p50':>11}{'gw p50':>8}{'added':>7}"
        f"{'direct p99':>11}{'gw p99':>8}{'added':>7}{'direct ttfb':>12}{'gw ttfb':>8}"
        f"{'added':>7}{'errors':>7}"
    )
    rows: list[dict[str, object]] = []
    for stream in (False, True):
        body = prompt_body(1000, stream)
        for rate in rates:
            drained(gateway)
            direct = open_loop(upstream_port, body, rate, seconds)
            through = open_loop(gateway.port, body, rate, seconds)
            mode = "stream" if stream else "whole"
            print(
                f"{mode:<10}{rate:>6.0f}{direct.p50_ms:>11.2f}{through.p50_ms:>8.2f}"
                f"{through.p50_ms - direct.p50_ms:>7.2f}{direct.p99_ms:>11.2f}"
                f"{through.p99_ms:>8.2f}{through.p99_ms - direct.p99_ms:>7.2f}"
                f"{direct.first_byte_p50_ms:>12.2f}{through.first_byte_p50_ms:>8.2f}"
                f"{through.first_byte_p50_ms - direct.first_byte_p50_ms:>7.2f}"
                f"{direct.errors + through.errors:>7}",
                flush=True,
            )
            rows.append({"stream": stream, "rate": rate, "direct": direct, "gateway": through})
    return rows


def soak(
    env: dict[str, str], workdir: Path, bodies: dict[tuple[int, bool], Path], seconds: float
) -> float | None:
    """A fresh gateway (on the same database) under ``seconds`` of load at concurrency 64:
    its RSS at the end, the target's measure, owing nothing to the 200 KB prompts before."""
    if not seconds:
        return None
    with GatewayProcess(env, workdir) as gateway:
        assert gateway.process is not None
        run = wrk(gateway.url + "/v1/chat/completions", bodies[(1000, False)], 64, seconds)
        rss = rss_mib(gateway.process.pid)[0]
        writer = writer_rss_mib(gateway.process.pid)
        seen = drained(gateway)
    print(
        f"soak, a fresh gateway: {seconds:.0f} s at c=64: {run.requests_per_second:.0f} "
        f"requests/s, {run.errors} errors, RSS at the end {rss:.1f} MiB, its writer process "
        f"{writer:.1f} MiB, together {rss + writer:.1f} MiB; records captured "
        f"{seen.get('records_captured_total', 0):.0f}, written "
        f"{seen.get('records_written_total', 0):.0f}"
    )
    return rss + writer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["postgresql", "sqlite", "off"],
        choices=["postgresql", "sqlite", "off", "sqlite-redacting", "sqlite-no-content"],
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 1000])
    parser.add_argument("--open-seconds", type=float, default=5.0)
    parser.add_argument("--soak", type=float, default=60.0, help="seconds at c=64 (0: none)")
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[20_000, 200_000], help="larger prompts, at c=16"
    )
    parser.add_argument(
        "--gateway-env", nargs="*", default=[], metavar="NAME=VALUE", help="more gateway settings"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")

    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-speed-"))
    workdir.chmod(0o755)  # the database server runs as its own user
    bodies: dict[tuple[int, bool], Path] = {}
    for size in (1000, 20_000, 200_000):
        for stream in (False, True):
            path = workdir / f"body-{size}-{'stream' if stream else 'whole'}.json"
            path.write_bytes(prompt_body(size, stream))
            bodies[(size, stream)] = path
    cells = [(stream, 1000, c) for stream in (False, True) for c in args.concurrency]
    cells += [(stream, size, 16) for stream in (False, True) for size in args.sizes]

    summary: dict[str, dict[str, Any]] = {}
    with serve_subprocess() as upstream:
        upstream_url = upstream.base_url + "/chat/completions"
        for config in args.configs:
            print(f"\n== gateway, capture {'off' if config == 'off' else 'into ' + config} ==")
            with history_database(config, workdir / config) as env:
                gateway_env = bench_settings(upstream.base_url, workdir / config, env)
                gateway_env.update(setting.split("=", 1) for setting in args.gateway_env)
                with GatewayProcess(gateway_env, workdir / config) as gateway:
                    assert gateway.process is not None
                    pid = gateway.process.pid
                    wrk(gateway.url + "/v1/chat/completions", bodies[(1000, False)], 16, 2)
                    closed = closed_loop_table(upstream_url, gateway, bodies, cells, args.duration)
                    opened = open_loop_table(upstream.port, gateway, args.rates, args.open_seconds)
                    seen = drained(gateway)
                    now, peak = rss_mib(pid)
                    writer = writer_rss_mib(pid)
                    print(
                        f"gateway RSS {now:.1f} MiB, peak {peak:.1f} MiB; its writer process "
                        f"{writer:.1f} MiB; records captured "
                        f"{seen.get('records_captured_total', 0):.0f}, written "
                        f"{seen.get('records_written_total', 0):.0f}, dropped "
                        f"{seen.get('records_dropped_total', 0):.0f}"
                    )
                soak_rss = soak(gateway_env, workdir / config / "soak", bodies, args.soak)
                summary[config] = {
                    "closed": closed,
                    "open": opened,
                    "peak": peak,
                    "soak_rss": soak_rss,
                }
    targets(summary)
    shutil.rmtree(workdir, ignore_errors=True)


def targets(summary: dict[str, dict[str, Any]]) -> None:
    """The figures issue 6 sets targets for, where this run measured them."""
    print("\n== targets ==")

    def cell(config: str, stream: bool, size: int, connections: int) -> dict[str, Any] | None:
        rows: list[dict[str, Any]] = summary.get(config, {}).get("closed", [])
        for row in rows:
            if (row["stream"], row["size"], row["connections"]) == (stream, size, connections):
                return row
        return None

    main = "postgresql" if "postgresql" in summary else next(iter(summary), None)
    if main is None:
        return
    one, sixteen = cell(main, False, 1000, 1), cell(main, False, 1000, 16)
    if one:
        added = one["gateway"].p50_ms - one["direct"].p50_ms
        print(f"[{main}] added p50, non-streamed, c=1: {added:.2f} ms (target <= 0.5)")
    if sixteen:
        added = sixteen["gateway"].p99_ms - sixteen["direct"].p99_ms
        rps = sixteen["gateway"].requests_per_second
        print(f"[{main}] added p99, non-streamed, c=16: {added:.2f} ms (target <= 5)")
        print(f"[{main}] requests/s, non-streamed, c=16: {rps:.0f} (target >= 2000)")
        off = cell("off", False, 1000, 16)
        if off:
            cost = 1 - rps / off["gateway"].requests_per_second
            print(f"[{main}] throughput lost to capture at c=16: {cost:.1%} (target <= 10%)")
    for row in summary[main]["open"]:
        if row["stream"]:
            added = row["gateway"].first_byte_p50_ms - row["direct"].first_byte_p50_ms
            print(
                f"[{main}] added time to first byte p50, streamed, open loop at "
                f"{row['rate']:.0f}/s: {added:.2f} ms (target <= 1 at c=1)"
            )
            break
    if summary[main]["soak_rss"] is not None:
        print(
            f"[{main}] RSS after the soak at c=64, gateway and writer processes together: "
            f"{summary[main]['soak_rss']:.1f} MiB (target <= 150 MB)"
        )


if __name__ == "__main__":
    main()
