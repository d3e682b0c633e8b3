"""How long each page of the history viewer (/ui) takes with a large history.

Fills a history database with N completions (default 100,000), starts the gateway on it,
signs in as the admin and as a user, and times each page (median of several runs, over
loopback, so the time is the server's): users, a user's conversations (first and second
page), a conversation, a search in English and in Chinese, errors, statistics, and the same
for a user's own pages.

    python bench/ui_pages.py [--backend sqlite|postgresql|mysql] [--total 100000] [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.history_reads import fill, median_ms, throwaway_database  # noqa: E402
from fake_upstream.testing import serve  # noqa: E402
from tests import bulk  # noqa: E402
from tests.managed import ADMIN, ADMIN_KEY, managed_gateway, new_member  # noqa: E402

TARGET_MS = 300


def signed_in(url: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    response = client.post("/ui/login", data={"key": key})
    assert response.status_code == 303, response.text
    return client


def measure(dsn: str, total: int, runs: int, backend: str) -> None:
    asyncio.run(fill(dsn, total, partitioned=False))
    print(f"backend {backend}: {total:,} completions of user {bulk.OWNER}\n")
    rows: list[tuple[str, float]] = []
    with serve() as upstream, managed_gateway(upstream, dsn, Path(tempfile.mkdtemp())) as gateway:
        admin = signed_in(gateway.url, ADMIN_KEY)
        api = httpx.Client(base_url=gateway.url + "/admin", headers=ADMIN, timeout=60)
        listed = api.get(f"/users/{bulk.OWNER}/conversations", params={"limit": 50}).json()
        conversation, last = listed["data"][0]["id"], listed["last_id"]
        pages = {
            "users (admin)": "/ui/",
            "a user's conversations": f"/ui/users/{bulk.OWNER}",
            "... their second page": f"/ui/users/{bulk.OWNER}?after={last}",
            "a conversation": f"/ui/conversations/{conversation}",
            "search, English": "/ui/search?q=" + bulk.PHRASES["english"],
            "search, Chinese": "/ui/search?q=" + bulk.PHRASES["chinese"],
            "errors": "/ui/errors",
            "statistics, 30 days": "/ui/stats",
            "statistics, a year": "/ui/stats?days=365",
        }
        for name, path in pages.items():
            rows.append((name, median_ms(runs, lambda p=path: admin.get(p))))
        member = new_member(gateway, "reader")
        reader = signed_in(gateway.url, member.key)
        rows.append(("a user's own statistics", median_ms(runs, lambda: reader.get("/ui/stats"))))
        rows.append(
            ("a user's own search", median_ms(runs, lambda: reader.get("/ui/search?q=report")))
        )
    width = max(len(name) for name, _ in rows)
    for name, ms in rows:
        verdict = "" if ms <= TARGET_MS else f"  over {TARGET_MS} ms"
        print(f"{name:<{width}}  {ms:8.1f} ms{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "mysql"), default="sqlite")
    parser.add_argument("--total", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with throwaway_database(args.backend, "bench_ui") as dsn:
        measure(dsn, args.total, args.runs, args.backend)


if __name__ == "__main__":
    main()
