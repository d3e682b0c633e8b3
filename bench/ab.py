"""This checkout's gateway against another checkout's (a commit before a change), in one run.

    git worktree add /tmp/before 5a500f4
    python bench/ab.py /tmp/before                      # ~10 minutes
    python bench/ab.py /tmp/before --configs sqlite --rounds 5 --duration 5

For each configuration (capture into SQLite, capture into PostgreSQL, capture off), both
gateways run side by side, each on a history of its own, in front of one fake upstream.
Each round runs wrk against the direct upstream, then this gateway and the other (which goes
first alternates), at each concurrency, non-streamed, ~1 KB prompt, with both writers
drained before each run. Prints every round and then the medians: requests/s, and latency added to
the direct upstream's in the same round. The machine's noise shows as the spread between
rounds; a change is within noise when the medians differ by less than that spread.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.speed import (  # noqa: E402
    WrkRun,
    bench_settings,
    drained,
    history_database,
    prompt_body,
    wrk,
)
from fake_upstream.testing import serve_subprocess  # noqa: E402
from tests.gateway_process import REPO, GatewayProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (a git worktree)")
    parser.add_argument("--configs", nargs="+", default=["sqlite", "postgresql", "off"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    other = args.other.resolve()
    if not (other / "gateway" / "__main__.py").exists():
        sys.exit(f"{other} is not a checkout of the gateway")

    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-ab-"))
    workdir.chmod(0o755)  # the database server runs as its own user
    print(f"this: {REPO}\nother: {other}")
    with serve_subprocess() as upstream:
        for config in args.configs:
            variants = {"this": (REPO, {}), "other": (other, {})}
            runs = side_by_side(
                upstream.base_url,
                config,
                workdir,
                variants,
                args.concurrency,
                args.rounds,
                args.duration,
            )
            summary(config, runs, args.concurrency, list(variants))
    shutil.rmtree(workdir, ignore_errors=True)


Variant = tuple[Path, dict[str, str]]  # a checkout, and the settings it runs with


def side_by_side(
    upstream_base: str,
    config: str,
    workdir: Path,
    variants: dict[str, Variant],
    levels: list[int],
    rounds: int,
    duration: float,
) -> dict[tuple[str, int], list[WrkRun]]:
    """wrk against the direct upstream and then each variant's gateway (which goes first
    alternates), at each concurrency, ``rounds`` times; every run, by name and concurrency."""
    body = workdir / "body.json"
    body.write_bytes(prompt_body(1000, False))
    direct_url = upstream_base + "/chat/completions"
    runs: dict[tuple[str, int], list[WrkRun]] = {}
    with history_database(config, workdir / config) as database:
        gateways = {}
        for name, (repo, extra) in variants.items():
            folder = workdir / config / name
            env = {**bench_settings(upstream_base, folder, dict(database)), **extra}
            if "MES_SQLITE_PATH" in env:  # each its own file
                env["MES_SQLITE_PATH"] = str(folder / "history.db")
            if "SQL_DSN" in env:  # each its own database on the one server
                env["SQL_DSN"] = env["SQL_DSN"].rsplit("/", 1)[0] + f"/mes_{name}"
            gateways[name] = GatewayProcess(env, folder, repo=repo).start()
        try:
            for gateway in gateways.values():  # warm up: pools, the database, the JIT
                wrk(gateway.url + "/v1/chat/completions", body, 16, 2)
            print(f"\n== capture {'off' if config == 'off' else 'into ' + config} ==")
            for round_ in range(1, rounds + 1):
                # Which goes first alternates: the second runs on a machine the first may
                # have left warmer, or busier.
                order = list(gateways.items())[:: 1 if round_ % 2 else -1]
                for connections in levels:
                    line = f"round {round_} c={connections:<3}"
                    direct = wrk(direct_url, body, connections, duration)
                    runs.setdefault(("direct", connections), []).append(direct)
                    line += f" direct {direct.requests_per_second:>7.0f}/s"
                    for name, gateway in order:
                        for each in gateways.values():  # no writer busy meanwhile
                            drained(each)
                        url = gateway.url + "/v1/chat/completions"
                        run = wrk(url, body, connections, duration)
                        runs.setdefault((name, connections), []).append(run)
                        line += (
                            f"  {name} {run.requests_per_second:>6.0f}/s "
                            f"+{run.p50_ms - direct.p50_ms:.2f}/"
                            f"+{run.p99_ms - direct.p99_ms:.2f} ms"
                        )
                    print(line, flush=True)
        finally:
            for gateway in gateways.values():
                gateway.stop()
    return runs


def summary(
    config: str, runs: dict[tuple[str, int], list[WrkRun]], levels: list[int], names: list[str]
) -> None:
    print(f"medians, capture {'off' if config == 'off' else 'into ' + config}:")
    print(f"{'':>8}{'conc':>5}{'req/s':>9}{'(range)':>17}{'added p50':>11}{'added p99':>11}")
    for connections in levels:
        direct = runs[("direct", connections)]
        for name in names:
            own = runs[(name, connections)]
            rates = [run.requests_per_second for run in own]
            p50 = [run.p50_ms - d.p50_ms for run, d in zip(own, direct, strict=True)]
            p99 = [run.p99_ms - d.p99_ms for run, d in zip(own, direct, strict=True)]
            spread = f"{min(rates):.0f}-{max(rates):.0f}"
            print(
                f"{name:>8}{connections:>5}{statistics.median(rates):>9.0f}{spread:>17}"
                f"{statistics.median(p50):>11.2f}{statistics.median(p99):>11.2f}"
            )


if __name__ == "__main__":
    main()
