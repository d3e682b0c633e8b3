"""This checkout's writer against another checkout's (a commit before a change), in one run.

    git worktree add /tmp/before e94e670
    python bench/writer_ab.py /tmp/before                    # ~15 minutes
    python bench/writer_ab.py /tmp/before --backends postgresql --loads 2000 --rounds 5

Runs ``bench/writer.py`` (this checkout's harness) on each checkout's code, one after the
other (which goes first alternates from round to round), for each backend and each load, on
a database server of its own each time, and prints every run and then the medians: records
written per second, and the CPU each record cost the writer process and the database server
(``/proc``). A load is ``RATE`` (records offered per second, every record a new
conversation) or ``RATE:TURNS`` (conversations that many turns long, each turn resending
the conversation so far, the turns of many conversations interleaved: most records
continue a conversation), and ``+prefill`` spools them all before the writer starts
(``bench/writer.py --prefill``): the writer alone on the machine with its database. A rate
the writer keeps up with measures what a record costs at that pace; one above what it can
write (``10000``) measures how many it writes per second at most, with the records'
producer on the same cores, as the gateway would be. The machine's noise shows as the
spread between rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT = re.compile(
    r"(?P<rate>\d+) records/s sustained.*?CPU a record: writer (?P<writer>\d+) us, "
    r"database (?P<database>\d+) us",
    re.S,
)


@dataclass(frozen=True)
class Run:
    records_per_second: int
    writer_us: int
    database_us: int

    @property
    def together_us(self) -> int:
        return self.writer_us + self.database_us


def measure(checkout: Path, backend: str, load: str, seconds: float) -> Run:
    prefill = load.endswith("+prefill")
    rate, _, turns = load.removesuffix("+prefill").partition(":")
    command = [
        sys.executable,
        str(REPO / "bench" / "writer.py"),
        "--backend",
        backend,
        "--rate",
        rate,
        "--seconds",
        str(seconds),
        "--turns",
        turns or "1",
        *(["--prefill"] if prefill else []),
    ]
    environment = {**os.environ, "MES_BENCH_CODE": str(checkout)}
    done = subprocess.run(
        command, cwd=checkout, env=environment, capture_output=True, text=True, timeout=900
    )
    found = RESULT.search(done.stdout)
    if done.returncode != 0 or found is None:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return Run(int(found["rate"]), int(found["writer"]), int(found["database"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (a git worktree)")
    parser.add_argument(
        "--backends", nargs="+", default=["postgresql", "mysql", "sqlite"], metavar="BACKEND"
    )
    parser.add_argument(
        "--loads",
        nargs="+",
        default=["2000", "2000:8", "10000", "10000+prefill"],
        metavar="RATE[:TURNS][+prefill]",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds records are offered")
    args = parser.parse_args()
    other = args.other.resolve()
    if not (other / "storage" / "writer_process.py").exists():
        sys.exit(f"{other} is not a checkout of the gateway")
    checkouts = {"this": REPO, "other": other}
    print(f"this: {REPO}\nother: {other}", flush=True)
    results: dict[tuple[str, str, str], list[Run]] = {}
    for backend in args.backends:
        for load in args.loads:
            for round_ in range(args.rounds):
                order = list(checkouts) if round_ % 2 == 0 else list(reversed(checkouts))
                for name in order:
                    run = measure(checkouts[name], backend, load, args.seconds)
                    results.setdefault((backend, load, name), []).append(run)
                    print(
                        f"{backend:<11}{load:>8}  round {round_ + 1}  {name:<6}"
                        f"{run.records_per_second:>7} records/s  writer {run.writer_us:>4} us"
                        f"  database {run.database_us:>4} us  together {run.together_us:>4} us",
                        flush=True,
                    )
    print(
        "\nmedians | backend | load | records/s (other -> this) | writer us | database us "
        "| together us"
    )
    for backend in args.backends:
        for load in args.loads:
            before, now = results[(backend, load, "other")], results[(backend, load, "this")]

            def pair(field: str, runs: tuple[list[Run], list[Run]] = (before, now)) -> str:
                a, b = (statistics.median(getattr(r, field) for r in rs) for rs in runs)
                if not a:  # SQLite: no database server, its work is the writer's
                    return "-"
                return f"{a:,.0f} -> {b:,.0f} ({(b - a) / a:+.0%})"

            print(
                f"| {backend} | {load} | {pair('records_per_second')} | {pair('writer_us')} "
                f"| {pair('database_us')} | {pair('together_us')} |"
            )


if __name__ == "__main__":
    main()
