"""What matches a redaction pattern, or with content capture off anything said, is nowhere
the gateway writes: not in any row of its history database, not in its spool on disk, not
in its dead letters, not in its log. Planted in every place a record holds text, for every
kind of record, on every backend."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from storage.database import create_engine, ensure_database, migrate
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB
from tests.managed import ADMIN, ADMIN_KEY

SECRET = "SECRET-4242"  # in what is said
NAMED = "SECRET-7777"  # in what names or describes a call: its user, agent, path, metadata
PATTERNS = '["SECRET-[0-9]+"]'
SAID = f"about {SECRET} please"  # within the 40 characters the fake model echoes back

# A database that refuses one end user's record for good, so that it is dead-lettered.
REFUSE_POISON = {
    "sqlite": [
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON completions "
        "WHEN NEW.end_user = 'poison' BEGIN SELECT RAISE(ABORT, 'poison is refused'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.end_user = 'poison' THEN "
        "RAISE EXCEPTION 'poison is refused' USING ERRCODE = 'check_violation'; END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON completions "
        "FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ],
    "mysql": [  # a NOT NULL column set to NULL: an integrity error, as a refusal is
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON completions FOR EACH ROW "
        "BEGIN IF NEW.end_user = 'poison' THEN SET NEW.owner = NULL; END IF; END"
    ],
}


def requests() -> Iterator[tuple[str, str, dict[str, Any] | None, dict[str, str]]]:
    """(method, path, body, headers): the secret in every field a record keeps as text."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": f"looks up {SECRET}",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    chat = [
        {"role": "system", "content": f"You keep {SECRET}."},
        {"role": "user", "content": SAID},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": f'{{"q": "{SECRET}"}}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": f"found {SECRET}"},
        {"role": "user", "content": [{"type": "text", "text": SAID}]},
    ]
    asked = {
        "model": "gpt-4o-mini",
        "messages": chat,
        "n": 2,  # the second choice is kept apart (extra_choices)
        "tools": tools,
        "metadata": {"note": NAMED},
        "user": f"user-{NAMED}",
    }
    agent = {"User-Agent": f"agent/{NAMED}", "X-Conversation-Id": f"conv-{NAMED}"}
    yield "POST", "/chat/completions", asked, agent
    yield "POST", "/chat/completions", {**asked, "stream": True, "n": 1}, {}
    failing = {"X-Fake-Status": "400", "X-Fake-Error-Message": f"bad value {SECRET}"}
    yield "POST", "/chat/completions", asked, failing
    responses = {"model": "gpt-4o-mini", "input": SAID, "instructions": f"keep {SECRET}"}
    yield "POST", "/responses", responses, {}
    yield "POST", "/responses", {**responses, "stream": True}, {}
    yield "POST", "/embeddings", {"model": "text-embedding-3-small", "input": [SAID]}, {}
    legacy = {"model": "gpt-3.5-turbo-instruct", "prompt": SAID, "suffix": SECRET}
    yield "POST", "/completions", legacy, {}
    claude = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "system": f"You keep {SECRET}.",
        "messages": [{"role": "user", "content": SAID}],
    }
    yield "POST", "/messages", claude, {"anthropic-version": "2023-06-01"}
    yield "POST", "/messages", {**claude, "stream": True}, {"anthropic-version": "2023-06-01"}
    yield "GET", f"/models?q={SECRET}", None, {}
    yield "GET", f"/files/file-{NAMED}", None, {}
    poison = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": SAID}]}
    yield "POST", "/chat/completions", {**poison, "user": "poison"}, {}


def _dead_letters(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """The dead letters, once there is one (the writer refuses the poison after retries)."""
    for _ in range(600):
        listed = httpx.get(gateway.url + "/admin/dead-letters", headers=ADMIN).json()["data"]
        if listed:
            return list(listed)
        time.sleep(0.05)  # a condition polled, bounded: at most 30 s
    raise AssertionError("no record was dead-lettered")


async def _refusing(history_dsn: str, backend: str) -> None:
    engine = create_engine(await ensure_database(history_dsn), pool_size=1)
    try:
        await migrate(engine, "history")
        async with engine.begin() as connection:
            for statement in REFUSE_POISON[backend]:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("content", ["patterns", "content off"])
async def test_a_secret_planted_everywhere_is_nowhere_the_gateway_writes(
    upstream: Any, history_dsn: str, backend: str, content: str, tmp_path: Path
) -> None:
    await _refusing(history_dsn, backend)
    spool = tmp_path / "spool"
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": history_dsn,
        "MES_SPOOL_DIR": str(spool),
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "LOG_LEVEL": "debug",
        **(
            {"MES_REDACT_PATTERNS": PATTERNS}
            if content == "patterns"
            else {"MES_CAPTURE_CONTENT": "false"}
        ),
    }
    asked = list(requests())
    with GatewayProcess(env, tmp_path) as gateway:
        with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
            statuses = [
                client.request(method, path, json=body, headers=headers).status_code
                for method, path, body, headers in asked
            ]
            db = HistoryDB(history_dsn)
            try:
                assert await db.wait_for("completions", 9) == 9
                assert await db.wait_for("request_logs", 2) == 2
                everything = await db.all_text()
                (answer,) = [
                    row for row in await db.completions() if row["extra_choices"] is not None
                ] or [None]
            finally:
                await db.close()
            letters = _dead_letters(gateway)
        log = gateway.log()
    assert statuses == [200, 200, 400, 200, 200, 200, 200, 200, 200, 200, 404, 200]
    (letter,) = letters
    assert letter["record"]["id"]  # the poisoned record is there, as its redacted rows
    spooled = b"".join(p.read_bytes() for p in spool.rglob("*") if p.is_file())
    assert b"poison" in spooled and len(spooled) > 10_000  # the spool does hold the records
    assert "gpt-4o-mini" in everything and "lookup" in everything  # what names is kept
    if content == "patterns":
        assert "[REDACTED]" in everything and b"[REDACTED]" in spooled
        assert answer is not None
        extra = orjson.loads(answer["extra_choices"])
        assert extra[0]["message"]["role"] == "assistant"  # the second choice is kept
        said: tuple[str, ...] = ("SECRET",)
    else:
        assert answer is None  # no second choice kept: it was said
        assert NAMED in everything  # who called, and how: metadata, which is kept
        said = (SECRET, "please", "Echo")  # nothing said, by the client or the model
    for word in said:
        assert word not in everything
        assert word.encode() not in spooled
        assert word not in log
