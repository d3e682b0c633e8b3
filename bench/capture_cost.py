"""What capture costs, against issue 25's targets, from one command.

    python bench/capture_cost.py                      # ~12 minutes a round, 3 rounds
    python bench/capture_cost.py --other /tmp/before  # and another checkout's, alternated
    python bench/capture_cost.py --rounds 1 --seconds 20 --soak 20    # a quick look

Each round measures, for this checkout (and ``--other``'s, which goes first alternates):

- the CPU each captured record costs, writer process and database server together (read
  from ``/proc``, ``bench/writer.py``), at a fixed offered rate each backend keeps up with,
  for ``--seconds``, a mixed load: conversations four turns long, the turns of many
  interleaved, each turn resending the conversation so far (a quarter of the records start
  a conversation, the rest continue one);
- the records per second the writer sustains into PostgreSQL, offered 10,000 a second
  (new conversations) for ``--seconds``, with the records' producer on the same cores;
- a gateway (one worker) capturing into SQLite, into PostgreSQL, and with capture off, each
  in front of the fake upstream: wrk at concurrency 16 (~1 KB prompts, non-streamed) right
  after the same load against the direct upstream: the p99 the gateway adds, and the share
  of capture-off's requests/s that capture costs; then 200 KB prompts at concurrency 16,
  after which the peak resident memory (``VmHWM``) of the gateway and its writer process
  is read and added up; and a fresh gateway's after ``--soak`` seconds at concurrency 64.

Then the medians over the rounds, beside the targets ("peak memory": the gateway's and its
writer process's ``VmHWM`` added up). Every figure of a round comes from
that round's own baseline (the direct upstream, capture off): the machine's noise shows as
the spread between rounds, printed with each median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.speed import (  # noqa: E402
    bench_settings,
    drained,
    history_database,
    prompt_body,
    rss_mib,
    wrk,
)
from bench.writer_ab import measure  # noqa: E402
from fake_upstream.testing import serve_subprocess  # noqa: E402
from tests.gateway_process import REPO, GatewayProcess  # noqa: E402

# The offered rate at which each backend's CPU a record is read: below what its writer
# sustains for the mixed load on this machine, so that the rate, not the backlog, is fixed.
CPU_RATES = {"postgresql": 2000, "mysql": 400, "sqlite": 1000}
MIXED_TURNS = 4


@dataclass(frozen=True)
class Figure:
    """One row of the table: its key, what it is, its target, and which way is better."""

    key: str
    label: str
    target: float
    unit: str
    lower_is_better: bool = True

    def met(self, value: float) -> bool:
        return value <= self.target if self.lower_is_better else value >= self.target


FIGURES = (
    Figure("cpu_postgresql", "CPU a record, writer + database, PostgreSQL", 100, "us"),
    Figure("cpu_mysql", "CPU a record, writer + database, MariaDB", 100, "us"),
    Figure("cpu_sqlite", "CPU a record, writer + database, SQLite", 100, "us"),
    Figure("throughput", "writer into PostgreSQL, records/s", 10_000, "/s", lower_is_better=False),
    Figure("p99_sqlite", "added p99 at c=16, SQLite", 5, "ms"),
    Figure("p99_postgresql", "added p99 at c=16, PostgreSQL", 5, "ms"),
    Figure("share_sqlite", "throughput lost to capture at c=16, SQLite", 15, "%"),
    Figure("share_postgresql", "throughput lost to capture at c=16, PostgreSQL", 15, "%"),
    Figure("soak_sqlite", "peak memory after the c=64 soak, SQLite", 150, "MiB"),
    Figure("soak_postgresql", "peak memory after the c=64 soak, PostgreSQL", 150, "MiB"),
    Figure("large_sqlite", "peak memory after 200 KB prompts, SQLite", 150, "MiB"),
    Figure("large_postgresql", "peak memory after 200 KB prompts, PostgreSQL", 150, "MiB"),
)


def writer_figures(checkout: Path, seconds: float) -> dict[str, float]:
    figures: dict[str, float] = {}
    for backend, rate in CPU_RATES.items():
        run = measure(checkout, backend, f"{rate}:{MIXED_TURNS}", seconds)
        figures[f"cpu_{backend}"] = run.together_us
        print(
            f"  {backend}, {rate}/s offered, {MIXED_TURNS}-turn conversations: "
            f"writer {run.writer_us} us + database {run.database_us} us a record",
            flush=True,
        )
    run = measure(checkout, "postgresql", "10000", seconds)
    figures["throughput"] = run.records_per_second
    print(f"  postgresql, 10000/s offered: {run.records_per_second} records/s", flush=True)
    return figures


def peak_mib(gateway: GatewayProcess) -> float:
    """The peak resident memory (VmHWM) of the gateway and its writer process, MiB."""
    assert gateway.process is not None
    pid = gateway.process.pid
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    return sum(rss_mib(each)[1] for each in pids)


def gateway_figures(
    checkout: Path, upstream_base: str, workdir: Path, seconds: float, soak: float
) -> dict[str, float]:
    small, large = workdir / "small.json", workdir / "large.json"
    small.write_bytes(prompt_body(1000, False))
    large.write_bytes(prompt_body(200_000, False))
    direct_url = upstream_base + "/chat/completions"
    figures: dict[str, float] = {}
    served: dict[str, float] = {}
    for config in ("off", "sqlite", "postgresql"):
        folder = workdir / config
        with history_database(config, folder) as database:
            env = bench_settings(upstream_base, folder, dict(database))
            with GatewayProcess(env, folder, repo=checkout) as gateway:
                url = gateway.url + "/v1/chat/completions"
                wrk(url, small, 16, 2)  # warm up: pools, the database
                drained(gateway)
                direct = wrk(direct_url, small, 16, seconds)
                through = wrk(url, small, 16, seconds)
                served[config] = through.requests_per_second
                line = (
                    f"  {config}: c=16 {through.requests_per_second:.0f} requests/s "
                    f"(direct {direct.requests_per_second:.0f}), added p99 "
                    f"{through.p99_ms - direct.p99_ms:.2f} ms"
                )
                if config != "off":
                    figures[f"p99_{config}"] = through.p99_ms - direct.p99_ms
                    share = 1 - through.requests_per_second / served["off"]
                    figures[f"share_{config}"] = 100 * share
                    drained(gateway)
                    wrk(url, large, 16, seconds)
                    drained(gateway)
                    figures[f"large_{config}"] = peak_mib(gateway)
                    line += f", {share:.1%} lost to capture; after 200 KB prompts "
                    line += f"{figures[f'large_{config}']:.1f} MiB"
            if config != "off" and soak:
                with GatewayProcess(env, folder / "soak", repo=checkout) as gateway:
                    wrk(gateway.url + "/v1/chat/completions", small, 64, soak)
                    figures[f"soak_{config}"] = peak_mib(gateway)
                    drained(gateway)
                line += f"; after the soak {figures[f'soak_{config}']:.1f} MiB"
        print(line, flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="another checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60.0, help="the writer's runs")
    parser.add_argument("--wrk-seconds", type=float, default=5.0, help="each wrk run")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds at c=64 (0: none)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    checkouts = {"this": REPO}
    if args.other is not None:
        if not (args.other / "gateway" / "__main__.py").exists():
            sys.exit(f"{args.other} is not a checkout of the gateway")
        checkouts["other"] = args.other.resolve()
    for name, path in checkouts.items():
        print(f"{name}: {path}")
    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-cost-"))
    workdir.chmod(0o755)  # the database servers run as their own users
    results: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    try:
        with serve_subprocess() as upstream:
            for round_ in range(1, args.rounds + 1):
                order = list(checkouts)[:: 1 if round_ % 2 else -1]
                for name in order:
                    print(f"\n== round {round_}, {name} ==", flush=True)
                    folder = workdir / f"{name}-{round_}"
                    folder.mkdir()
                    figures = writer_figures(checkouts[name], args.seconds)
                    figures |= gateway_figures(
                        checkouts[name], upstream.base_url, folder, args.wrk_seconds, args.soak
                    )
                    results[name].append(figures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)


def print_table(results: dict[str, list[dict[str, float]]]) -> None:
    names = list(results)
    rounds = len(next(iter(results.values())))
    print(f"\nmedians of {rounds} round(s) (range)")
    header = f"| figure | target | {' | '.join(names)} | met ({names[0]}) |"
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|")
    for figure in FIGURES:
        cells, medians = [], []
        for name in names:
            values = [each[figure.key] for each in results[name] if figure.key in each]
            medians.append(statistics.median(values) if values else None)
            spread = f"{_number(min(values))}-{_number(max(values))}" if values else ""
            cells.append(f"{_number(statistics.median(values))} ({spread})" if values else "")
        sign = "<=" if figure.lower_is_better else ">="
        target = f"{sign} {_number(figure.target)} {figure.unit}"
        met = "" if medians[0] is None else ("yes" if figure.met(medians[0]) else "no")
        print(f"| {figure.label} | {target} | {' | '.join(cells)} | {met} |")


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


if __name__ == "__main__":
    main()
