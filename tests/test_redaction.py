"""Redaction patterns keep what matches them out of the history database."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from capture.chat import ChatExchange
from capture.codec import from_entry, shaped_entry, to_entry
from capture.redaction import Redactor
from capture.rows import RowSet
from capture.shaped import Shaped
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


def _chat_record(**fields: Any) -> ChatExchange:
    asked = {
        "model": "m",
        "n": 2,
        "user": f"u {OTHER_KEY}",
        "metadata": {"k": OTHER_KEY},
        "messages": [{"role": "user", "content": f"card {CARD}"}],
    }
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": f"{i}: {CARD}"}}
            for i in range(2)
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
    return ChatExchange(
        owner="ann",
        key_fingerprint="fp",
        client_ip="127.0.0.1",
        user_agent=f"agent {OTHER_KEY}",
        conversation_header=None,
        request=asked,
        stream=False,
        started_at=datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC),
        status=200,
        response_body=orjson.dumps(answer),
        **fields,
    )


def test_a_redacting_gateway_spools_rows_with_nothing_that_matches_and_the_writer_keeps_them() -> (
    None
):
    redactor = Redactor(orjson.loads(PATTERNS))
    record = _chat_record(error_message=f"upstream quoted {CARD}")
    entry = shaped_entry(redactor)(record)
    assert CARD.encode() not in entry and OTHER_KEY.encode() not in entry
    back = from_entry(entry)
    assert isinstance(back, Shaped) and back.id == record.id
    rows = back.rows()
    assert rows.redacted and Redactor(orjson.loads(PATTERNS)).rows(rows) is rows  # not twice
    expected = redactor.rows(record.rows())
    completion, stored = rows.completion, expected.completion
    assert completion is not None and stored is not None
    assert completion == stored
    assert rows.messages == expected.messages and rows.conversation == expected.conversation
    assert completion["started_at"] == record.started_at
    assert completion["error_message"] == "upstream quoted [REDACTED]"
    assert completion["user_agent"] == completion["end_user"].replace("u ", "agent ")
    assert "[REDACTED]" in completion["extra_choices"] and CARD not in completion["params"]
    assert [m["content_text"] for m in rows.messages] == ["card [REDACTED]", "0: [REDACTED]"]


def test_with_nothing_to_redact_records_are_spooled_as_they_came() -> None:
    assert not Redactor(()).active
    assert Redactor((), capture_content=False).active and Redactor(["x"]).active


def test_a_shaped_record_with_an_integer_past_64_bits_is_spooled_without_it() -> None:
    rowset = RowSet({"completions": [{"id": "a", "prompt_tokens": 2**70, "status_code": 200}]})
    back = from_entry(to_entry(Shaped("a", rowset))).rows()
    assert back.completion == {"id": "a", "prompt_tokens": None, "status_code": 200}
