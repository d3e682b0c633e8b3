"""A large history written straight into the database, for search and export at scale.

Each completion is a conversation of its own: a question and an answer, stored as the
gateway stores them (chained hashes, string content in ``content_text``). A few questions
carry planted phrases in English, Chinese and Japanese, in the middle of other text.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from capture.chain import chain
from capture.message_rows import message_row
from storage.batch import add_usage
from storage.schema import completions, conversations, messages
from storage.usage import tally

OWNER = "user_bulk"
PHRASES = {
    "english": "quarterly llama migration",
    "chinese": "量子计算机的未来",
    "japanese": "東京の桜は美しい",
}
WORDS = (
    "report budget weather travel 会议 数据 学习 天气 旅行 です ます 日本 データ 会社 "
    "model answer question cloud server 服务器 模型 問題 答え"
).split()
CHUNK = 2000


def planted_at(total: int) -> dict[str, list[int]]:
    """Which completions carry each phrase: three apiece, spread over the history."""
    return {
        name: [total // 10 + n, total // 2 + n, total - 10 + n] for n, name in enumerate(PHRASES)
    }


def _question(index: int, planted: dict[int, str], rng: random.Random) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(12))
    phrase = planted.get(index)
    return f"{words} {phrase} {words}" if phrase else f"question {index}: {words}"


SPACING = timedelta(seconds=20)


def span(total: int) -> tuple[datetime, datetime]:
    """When the first and the last of ``total`` completions start, ``SPACING`` apart: from
    30 days ago on, or earlier when that many would reach into the future."""
    now = datetime.now(UTC).replace(tzinfo=None)
    start = min(now - timedelta(days=30), now - timedelta(minutes=1) - SPACING * total)
    return start, start + SPACING * (total - 1)


async def fill(engine: AsyncEngine, total: int, owner: str = OWNER) -> dict[str, list[int]]:
    """Write ``total`` completions for ``owner``; where the phrases were planted."""
    where = planted_at(total)
    planted = {index: PHRASES[name] for name, indexes in where.items() for index in indexes}
    rng = random.Random(7)
    start, _ = span(total)
    for first in range(0, total, CHUNK):
        rows: dict[str, list[dict[str, Any]]] = {"c": [], "m": [], "r": []}
        for index in range(first, min(first + CHUNK, total)):
            at = start + SPACING * index
            sent = [{"role": "user", "content": _question(index, planted, rng)}]
            answer = {"role": "assistant", "content": f"answer {index} {rng.choice(WORDS)}"}
            conversation_id = f"bulk-{owner}-{index:08d}"
            hashes = []
            for digest, parent, message in chain([*sent, answer]):
                rows["m"].append(message_row(conversation_id, digest, parent, message, at))
                hashes.append(digest)
            rows["c"].append(
                {
                    "id": conversation_id,
                    "owner": owner,
                    "title": sent[0]["content"][:80],
                    "created_at": at,
                    "updated_at": at,
                    "completion_count": 1,
                    "message_count": 2,
                    "prompt_tokens": 20,
                    "completion_tokens": 5,
                    "total_tokens": 25,
                }
            )
            rows["r"].append(
                {
                    "id": f"rec-{owner}-{index:08d}",
                    "response_id": f"chatcmpl-{owner}-{index:08d}",
                    "conversation_id": conversation_id,
                    "owner": owner,
                    "requested_model": "gpt-4o-mini",
                    "response_model": "gpt-4o-mini-2024-07-18",
                    "params": orjson.dumps({"model": "gpt-4o-mini"}).decode(),
                    "request_hash": hashes[0],
                    "request_message_count": 1,
                    "response_hash": hashes[1],
                    "finish_reason": "stop",
                    "prompt_tokens": 20,
                    "completion_tokens": 5,
                    "total_tokens": 25,
                    "cost_usd": 6e-06,  # gpt-4o-mini's price of these tokens
                    "price_version": "genai-prices 0.2.3",
                    "status_code": 200,
                    "stream": index % 2 == 0,
                    "started_at": at,
                    "latency_ms": 100.0 + index % 50,
                }
            )
        async with engine.begin() as connection:
            await connection.execute(insert(conversations), rows["c"])
            await connection.execute(insert(messages), rows["m"])
            await connection.execute(insert(completions), rows["r"])
            await add_usage(connection, tally(rows["r"]))  # as the writer would
    return where
