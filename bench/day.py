"""A day's traffic, replayed through the writer at 100x speed: what the day's shape does to
the writer and the database.

    python bench/day.py [--backend postgresql] [--rate 600] [--speed 100] [--hours 24]

``bench/writer.py`` offers one kind of record at a steady rate. A real day is not steady:
quiet at night, a peak in the afternoon, bursts (a batch job, a team's demo), chat
conversations of a few turns, a few very long ones, and agent loops that call tools turn
after turn and resend everything each time. This replays such a day, in simulated time
``--speed`` times faster than real time, through the gateway's own writer process (as
``bench/writer.py``: records shaped as the proxy would hand them, spooled by this process,
written by a writer process of its own) into a throwaway durable database:

- **Sessions** start at a rate that follows the day (a quarter of the mean at night, about
  twice the mean at the afternoon peak) plus ``BURSTS`` bursts of ten simulated minutes at
  four times the rate of their hour.
- **Kinds**: 70 % chats (a geometric number of turns, mean 4, a user's pause of 20-120
  simulated seconds between turns), 5 % long chats (40-100 turns), 25 % agent loops (3-25
  steps two to ten simulated seconds apart, each step a tool call answered by a tool
  result, then a final answer; every step resends the whole loop, tools offered).
- ``--rate`` is the mean of records a *real* second over the day (the simulated day holds
  ``rate x 86400 / speed`` records).

Prints, each simulated hour, the records offered and written, the writer's backlog at the
hour's end and its peak, and the CPU a record cost the writer and the database in that
hour; then the day's totals: records, bytes a record stored (by table), CPU a record, the
peak backlog and how long after the peak hour it took to drain.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.speed import FILLER  # noqa: E402
from bench.writer import cpu_seconds, database, started_writer, stored_bytes  # noqa: E402
from capture.chat import ChatExchange  # noqa: E402
from fake_upstream.responses import Answer  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from storage.writer_process import WriterProcess  # noqa: E402

DAY = 86_400
BURSTS = 3
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name.replace('_', ' ')} for the agent",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
    for name in ("search_docs", "run_query", "read_file")
]
# Records a session of each kind makes on average: for the session rate that gives --rate.
KINDS = (("chat", 0.70, 4.0), ("long", 0.05, 70.0), ("agent", 0.25, 15.0))


def shape(hour: float) -> float:
    """The day's rate at ``hour``, relative (a mean near 1 over the day): a quarter at night,
    rising from 7:00 to a peak near 13:00, down by 21:00."""
    day = max(0.0, math.sin(math.pi * (hour - 7) / 14)) ** 2 if 7 <= hour <= 21 else 0.0
    return 0.25 + 1.85 * day


_MEAN = sum(shape(h / 60) for h in range(24 * 60)) / (24 * 60)


@dataclass(order=True)
class Step:
    at: float  # simulated seconds into the day
    number: int
    session: Session = field(compare=False)


@dataclass
class Session:
    kind: str
    name: str
    user: str
    steps: int  # records it makes
    messages: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0


def _sessions_per_second(rate: float, speed: float) -> float:
    """Simulated sessions a simulated second, on average, for ``rate`` records a real second."""
    records_per_session = sum(share * mean for _, share, mean in KINDS)
    return rate / speed / records_per_session


def _new_session(random_: random.Random, number: int) -> Session:
    kind = random_.choices([k for k, _, _ in KINDS], [s for _, s, _ in KINDS])[0]
    if kind == "chat":
        steps = min(20, 1 + int(random_.expovariate(1 / 3)))
    elif kind == "long":
        steps = random_.randint(40, 100)
    else:
        steps = random_.randint(3, 25)
    session = Session(kind, f"s{number}", f"user-{random_.randrange(500)}", steps)
    system = "You are an agent with tools." if kind == "agent" else "You are a helpful assistant."
    session.messages.append({"role": "system", "content": system})
    return session


def _pause(random_: random.Random, session: Session) -> float:
    return random_.uniform(2, 10) if session.kind == "agent" else random_.uniform(20, 120)


def _record(session: Session, started: datetime, random_: random.Random) -> ChatExchange:
    """The session's next record: its request resends the session so far, and the answer
    goes into the session for the next one."""
    last = session.done == session.steps - 1
    if session.kind == "agent" and session.done:
        call = session.messages[-1]["tool_calls"][0]
        result = FILLER[: random_.randint(200, 1500)]
        session.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    else:
        words = FILLER[: random_.randint(60, 900)]
        session.messages.append(
            {"role": "user", "content": f"{session.name} turn {session.done}: {words}"}
        )
    request: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": list(session.messages),
        "user": session.user,
    }
    if session.kind == "agent":
        request["tools"] = TOOLS
    if session.kind == "agent" and not last:  # another tool call, even after a tool's result
        answer = Answer({**request, "messages": [*request["messages"], {"role": "user"}]})
    else:
        answer = Answer({key: value for key, value in request.items() if key != "tools"})
    session.messages.append(answer.message())
    session.done += 1
    return ChatExchange(
        owner="bench",
        key_fingerprint=None,
        client_ip="127.0.0.1",
        user_agent="bench-day/1",
        conversation_header=None,
        request=request,
        stream=False,
        started_at=started,
        status=200,
        response_body=answer.completion(),
        first_byte_ms=random_.uniform(200, 900),
        latency_ms=random_.uniform(400, 4000),
    )


@dataclass
class Hour:
    offered: int = 0
    written: int = 0
    backlog: int = 0
    peak_backlog: int = 0
    writer_cpu: float = 0.0
    database_cpu: float = 0.0


async def run(dsn: str, server: int | None, args: argparse.Namespace, workdir: Path) -> None:
    settings = replace(
        Settings(), sql_dsn=dsn, spool_dir=str(workdir / "spool"), spool_max_bytes=2**36
    )
    _, writer = await started_writer(settings)
    assert writer.process is not None
    writer_pid = writer.process.pid
    random_ = random.Random(args.seed)
    seconds = args.hours * 3600
    per_second = _sessions_per_second(args.rate, args.speed)
    bursts = sorted(random_.uniform(8, 20) * 3600 for _ in range(BURSTS))
    day_start = datetime(2026, 11, 30, tzinfo=UTC).replace(tzinfo=None)
    steps: list[Step] = []
    sessions = 0
    hours: list[Hour] = []
    counted = (0, cpu_seconds(writer_pid), cpu_seconds(server, children=True))
    began = time.perf_counter()
    simulated = 0.0
    closed = 0  # hours printed
    print(
        f"{'hour':>4}{'offered':>10}{'written':>10}{'backlog':>9}{'peak':>8}"
        f"{'writer us':>11}{'db us':>8}",
        flush=True,
    )
    while simulated < seconds:
        # This process's clock, in simulated seconds, moves in steps of ~10 ms real.
        now = min(seconds, (time.perf_counter() - began) * args.speed)
        while simulated < now:  # sessions starting in each simulated second
            hour = simulated / 3600
            rate = per_second * shape(hour % 24) / _MEAN
            if any(b <= simulated < b + 600 for b in bursts):
                rate *= 4
            for _ in range(_poisson(random_, rate)):
                session = _new_session(random_, sessions)
                sessions += 1
                start = simulated + random_.random()
                heapq.heappush(steps, Step(start, random_.getrandbits(32), session))
            simulated += 1
        while steps and steps[0].at <= now:
            step = heapq.heappop(steps)
            started = day_start + timedelta(seconds=step.at)
            writer.submit(_record(step.session, started, random_))
            _hour(hours, step.at).offered += 1
            if step.session.done < step.session.steps:
                step.at += _pause(random_, step.session)
                heapq.heappush(steps, step)
        current = _hour(hours, min(now, seconds - 1))
        current.peak_backlog = max(current.peak_backlog, writer.depth)
        while closed < int(now // 3600):  # an hour over: what was written in it
            counted = _close_hour(hours[closed], writer, writer_pid, server, counted)
            _print(closed, hours[closed])
            closed += 1
        await asyncio.sleep(0.01)
    while closed < len(hours):
        counted = _close_hour(hours[closed], writer, writer_pid, server, counted)
        _print(closed, hours[closed])
        closed += 1
    peak_hour = max(range(len(hours)), key=lambda h: hours[h].offered)
    drain_started = time.perf_counter()
    while writer.depth:  # noqa: ASYNC110 (a counter in another process's memory)
        await asyncio.sleep(0.05)
    drained = time.perf_counter() - drain_started
    total_written = writer.state["records_written"]
    writer_cpu = cpu_seconds(writer_pid)
    database_cpu = cpu_seconds(server, children=True)
    await writer.close(5)
    sizes = await stored_bytes(dsn)
    stored = sum(sizes.values())
    offered = sum(h.offered for h in hours)
    peak = hours[peak_hour].offered
    largest = max(h.peak_backlog for h in hours)
    print(
        f"\nthe day: {sessions:,} sessions, {offered:,} records offered, {total_written:,} "
        f"written, {writer.state['records_failed']} failed; the peak hour ({peak_hour}:00) "
        f"offered {peak:,} ({peak / 3600 * args.speed:,.0f} records/s real); the largest "
        f"backlog {largest:,} records; {drained:.1f} s to drain what was left at the end"
    )
    print(
        f"CPU a record over the day: writer {writer_cpu / max(1, total_written) * 1e6:,.0f} us, "
        f"database {database_cpu / max(1, total_written) * 1e6:,.0f} us (from the writer's "
        f"start, setup included)"
    )
    print(
        f"stored: {stored / 2**20:,.1f} MiB, {stored / max(1, total_written):,.0f} bytes a record ("
        + ", ".join(
            f"{name} {size / max(1, total_written):,.0f}" for name, size in sorted(sizes.items())
        )
        + ")"
    )


def _hour(hours: list[Hour], simulated: float) -> Hour:
    while len(hours) <= int(simulated // 3600):
        hours.append(Hour())
    return hours[int(simulated // 3600)]


def _close_hour(
    hour: Hour,
    writer: WriterProcess,
    writer_pid: int,
    server: int | None,
    counted: tuple[int, float, float],
) -> tuple[int, float, float]:
    written = writer.state["records_written"]
    now = (written, cpu_seconds(writer_pid), cpu_seconds(server, children=True))
    hour.written = max(1, now[0] - counted[0])
    hour.backlog = writer.depth
    hour.writer_cpu = (now[1] - counted[1]) / hour.written
    hour.database_cpu = (now[2] - counted[2]) / hour.written
    return now


def _print(number: int, hour: Hour) -> None:
    print(
        f"{number:>4}{hour.offered:>10,}{hour.written:>10,}{hour.backlog:>9,}"
        f"{hour.peak_backlog:>8,}{hour.writer_cpu * 1e6:>11,.0f}{hour.database_cpu * 1e6:>8,.0f}",
        flush=True,
    )


def _poisson(random_: random.Random, mean: float) -> int:
    """A Poisson-distributed count (Knuth's method; the means here are small)."""
    if mean > 30:
        return max(0, round(random_.gauss(mean, math.sqrt(mean))))
    limit, count, product = math.exp(-mean), 0, random_.random()
    while product > limit:
        count += 1
        product *= random_.random()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=["sqlite", "postgresql", "mysql"], default="postgresql"
    )
    parser.add_argument("--rate", type=float, default=600, help="mean records a real second")
    parser.add_argument("--speed", type=float, default=100, help="simulated seconds a second")
    parser.add_argument("--hours", type=float, default=24, help="simulated hours from 0:00")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mes-bench-day-"))
    workdir.chmod(0o755)  # the database servers run as their own users
    try:
        with database(args.backend, workdir) as (dsn, server):
            import uvloop

            uvloop.run(run(dsn, server, args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
