"""History at scale, on every backend: search finds English, Chinese and Japanese phrases
among 100,000 completions (200,000 messages), and exporting them all as fine-tuning JSONL
streams with the gateway's memory nearly flat."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from storage.database import create_engine, ensure_database, migrate
from tests import bulk
from tests.managed import ADMIN, managed_gateway

TOTAL = 100_000
ROLES = {"system", "developer", "user", "assistant", "tool"}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRSS(threading.Thread):
    """Samples a process's resident memory every 20 ms until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, rss_bytes(pid), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak


def fine_tuning_problems(example: Any) -> list[str]:
    """What keeps a line from being an example of OpenAI's chat fine-tuning format."""
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list):
        return ["not an object with a messages list"]
    turns = example["messages"]
    problems = []
    if not turns or turns[-1].get("role") != "assistant":
        problems.append("the last message is not the assistant's")
    for turn in turns:
        if turn.get("role") not in ROLES:
            problems.append(f"role {turn.get('role')!r}")
        if any(value is None for value in turn.values()):
            problems.append("a null field")
        content = turn.get("content")
        if turn.get("role") == "assistant":
            if not isinstance(content, str) and not turn.get("tool_calls"):
                problems.append("an assistant message with neither content nor tool calls")
        elif not isinstance(content, (str, list)):
            problems.append("a message without content")
    return problems


async def test_search_and_export_over_100k_completions(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    engine = create_engine(await ensure_database(history_dsn), pool_size=1)
    try:
        await migrate(engine, "history")
        planted = await bulk.fill(engine, TOTAL)
    finally:
        await engine.dispose()

    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        admin = httpx.Client(base_url=gateway.url + "/admin", headers=ADMIN, timeout=120)
        for name, phrase in bulk.PHRASES.items():
            for params in ({"q": phrase, "user_id": bulk.OWNER}, {"q": phrase}):
                found = admin.get("/search", params={**params, "limit": 10})
                assert found.status_code == 200, found.text
                hits = found.json()["data"]
                expected = {f"bulk-{bulk.OWNER}-{i:08d}" for i in planted[name]}
                assert {hit["conversation_id"] for hit in hits} == expected
                assert all(phrase in hit["snippet"] for hit in hits)
        assert admin.get("/search", params={"q": "量子计算机的过去"}).json()["data"] == []

        assert gateway.process is not None
        sampler = PeakRSS(gateway.process.pid)
        baseline = sampler.peak
        sampler.start()
        lines = 0
        params = {"format": "fine-tuning", "user_id": bulk.OWNER}
        with admin.stream("GET", "/export", params=params) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            for line in response.iter_lines():
                if not line:
                    continue
                example = orjson.loads(line)
                assert fine_tuning_problems(example) == []
                # Oldest first, each with its own question and answer.
                assert example["messages"][-1]["content"].startswith(f"answer {lines} ")
                lines += 1
        growth = sampler.stop() - baseline
    assert lines == TOTAL
    print(f"export: {lines} lines; gateway RSS grew {growth / 2**20:.1f} MiB")
    assert growth < 50 * 2**20
