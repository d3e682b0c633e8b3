"""Redaction patterns keep what matches them out of the history database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import ConfigError, Settings
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

CARD = "4111 1111 1111 1111"
OTHER_KEY = "sk-live-abcdefghijklmnopqrstuvwxyz"
PATTERNS = r'["\\b(?:\\d[ -]?){15}\\d\\b", "sk-live-[A-Za-z0-9]+"]'


def test_patterns_that_are_not_a_json_array_of_regexes_stop_the_gateway_at_start() -> None:
    for raw in ("sk-.*", '["(unclosed"]', "[1, 2]"):
        with pytest.raises(ConfigError, match="MES_REDACT_PATTERNS"):
            Settings.from_env({"MES_REDACT_PATTERNS": raw})
    assert Settings.from_env({"MES_REDACT_PATTERNS": PATTERNS}).redact_patterns == (
        r"\b(?:\d[ -]?){15}\d\b",
        "sk-live-[A-Za-z0-9]+",
    )


async def test_content_matching_a_pattern_never_reaches_the_database(
    upstream: Any, tmp_path: Path
) -> None:
    env = {"UPSTREAM_BASE_URL": upstream.base_url, "MES_REDACT_PATTERNS": PATTERNS}
    first = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"My card is {CARD}, and my key {OTHER_KEY}."},
    ]
    with GatewayProcess(env, tmp_path) as gateway:
        reply = httpx.post(
            gateway.base_url + "/chat/completions", json={"model": "m", "messages": first}
        ).json()
        second = [
            *first,
            {"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
            {"role": "user", "content": [{"type": "text", "text": f"again: {CARD}"}]},
        ]
        httpx.post(gateway.base_url + "/chat/completions", json={"model": "m", "messages": second})
        db = HistoryDB(str(tmp_path / "mes_gateway.db"))
        try:
            assert await db.wait_for("completions", 2) == 2
            everything = await db.all_text()
            rows = sorted(await db.completions(), key=lambda r: r["request_message_count"])
            rebuilt, answer = await db.request_and_answer(rows[-1])
        finally:
            await db.close()
    assert CARD not in everything and OTHER_KEY not in everything
    assert "[REDACTED]" in everything
    assert rebuilt[1]["content"] == "My card is [REDACTED], and my key [REDACTED]."
    assert rebuilt[3]["content"] == [{"type": "text", "text": "again: [REDACTED]"}]
    assert rebuilt[0] == first[0] and rebuilt[2]["role"] == "assistant"
    assert len({row["conversation_id"] for row in rows}) == 1  # still one conversation


async def test_with_capture_content_off_no_content_is_stored_and_turns_still_group(
    upstream: Any, tmp_path: Path
) -> None:
    env = {"UPSTREAM_BASE_URL": upstream.base_url, "MES_CAPTURE_CONTENT": "false"}
    first = [{"role": "user", "content": "Tell me about the merger with Globex"}]
    with GatewayProcess(env, tmp_path) as gateway:
        reply = httpx.post(
            gateway.base_url + "/chat/completions", json={"model": "m", "messages": first}
        ).json()
        answered = reply["choices"][0]["message"]["content"]
        second = [
            *first,
            {"role": "assistant", "content": answered},
            {"role": "user", "content": "And the Initech deal?"},
        ]
        httpx.post(gateway.base_url + "/chat/completions", json={"model": "m", "messages": second})
        db = HistoryDB(str(tmp_path / "mes_gateway.db"))
        try:
            assert await db.wait_for("completions", 2) == 2
            everything = await db.all_text()
            conversations = await db.count("conversations")
            rows = sorted(await db.completions(), key=lambda r: r["request_message_count"])
            rebuilt, answer = await db.request_and_answer(rows[-1])
        finally:
            await db.close()
    for said in ("Globex", "Initech", answered):
        assert said not in everything
    assert conversations == 1  # the second turn still found the first
    assert [m["role"] for m in rebuilt] == ["user", "assistant", "user"]
    assert all(m["content"] is None for m in [*rebuilt, answer])
    assert rows[-1]["total_tokens"] and rows[-1]["finish_reason"] == "stop"
