"""No endpoint, id, cursor or filter lets one caller see or change another's history.

Hypothesis plays caller A against B's history on every backend: B's ids as they are and
tampered with (case, affixes, wildcards, injection), as path ids, cursors and filters, on
every stored-completions endpoint and with A's key on the admin API. Nothing of B's may
come back, and B's history must be as it was.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from tests.history_db import HistoryDB
from tests.managed import ADMIN, managed_gateway, new_member

B_COUNT = 6
INJECTIONS = ["' OR '1'='1", "%", "_", "*", "..", "../", "%25", "\\", "' --", '"', "\x00"]


def b_history(client: OpenAI) -> tuple[set[str], set[str]]:
    """B's completions, each with a secret in its question and its metadata; their ids and
    the secrets."""
    ids, secrets = set(), set()
    for n in range(B_COUNT):
        secret = f"SECRET-B-{n}-zq"
        reply = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"my password is {secret}"}],
            metadata={"owner": "bob", "tag": f"b-meta-{n}"},
        )
        ids.add(reply.id)
        secrets |= {secret, f"b-meta-{n}"}
    return ids, secrets


def tampered(values: list[str]) -> st.SearchStrategy[str]:
    base = st.sampled_from(values)
    return st.one_of(
        base,
        base.map(str.upper),
        st.tuples(base, st.sampled_from(INJECTIONS)).map(lambda p: p[0] + p[1]),
        st.tuples(st.sampled_from(INJECTIONS), base).map(lambda p: p[0] + p[1]),
        base.map(lambda v: v[: len(v) // 2]),
        base.map(lambda v: v + "-0"),
        st.sampled_from(INJECTIONS),
        st.text(max_size=12),
    )


def test_caller_a_finds_nothing_of_caller_b(
    upstream: Any, history_dsn: str, tmp_path: Path
) -> None:
    with managed_gateway(upstream, history_dsn, tmp_path) as gateway:
        alice, bob = new_member(gateway, "alice"), new_member(gateway, "bob")
        bob_sdk = OpenAI(base_url=gateway.base_url, api_key=bob.key)
        alice_sdk = OpenAI(base_url=gateway.base_url, api_key=alice.key)
        bob_ids, secrets = b_history(bob_sdk)
        alice_ids = {
            alice_sdk.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"alice asks {n}"}],
                metadata={"owner": "alice"},
            ).id
            for n in range(3)
        }
        rows = asyncio.run(_recorded(history_dsn, B_COUNT + 3))
        bob_rows = [r for r in rows if r["owner"] == bob.user_id]
        known = sorted(
            bob_ids
            | {r["id"] for r in bob_rows}
            | {r["conversation_id"] for r in bob_rows}
            | {bob.user_id, bob.key_id}
        )
        before = _bobs_view(bob_sdk)
        a = httpx.Client(
            base_url=gateway.base_url, headers={"Authorization": f"Bearer {alice.key}"}
        )
        admin_with_alices_key = httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {alice.key}"}
        )

        def leaks(response: httpx.Response, sent: str) -> list[str]:
            return [s for s in secrets if s in response.text and s not in sent]

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(
            target=tampered(known),
            cursor=tampered(known),
            key=st.sampled_from(["owner", "tag", "n"]) | tampered(known),
            value=st.sampled_from(["bob", "b-meta-0", "alice"]) | tampered(known),
            order=st.sampled_from(["asc", "desc", "DESC", "x"]),
        )
        def a_probes(target: str, cursor: str, key: str, value: str, order: str) -> None:
            probes.append(target)
            sent = " ".join((target, cursor, key, value))
            listed = a.get(
                "/chat/completions",
                params={"after": cursor, "order": order, "model": value, f"metadata[{key}]": value},
            )
            assert listed.status_code in (200, 400, 404), listed.text
            if listed.status_code == 200:
                assert {c["id"] for c in listed.json()["data"]} <= alice_ids
            quoted = "/chat/completions/" + quote(target, safe="")
            responses = [
                listed,
                a.get(quoted),
                a.get(quoted + "/messages", params={"after": cursor}),
                a.post(quoted, json={"metadata": {"owner": "alice-was-here"}}),
                a.delete(quoted),
                admin_with_alices_key.get(f"/admin/users/{bob.user_id}/completions"),
                admin_with_alices_key.get("/admin/search", params={"q": value or "SECRET"}),
            ]
            for response in responses:
                assert response.status_code < 500, response.text
                assert leaks(response, sent) == []
            for response in responses[1:5]:
                if target in bob_ids or target in known:
                    assert response.status_code in (400, 404, 405), (target, response.text)
            assert responses[-1].status_code == 401 and responses[-2].status_code == 401

        probes: list[str] = []
        a_probes()
        assert len(probes) >= 150
        # Alice's own history is hers to see, and Bob's is as it was.
        assert {c["id"] for c in a.get("/chat/completions").json()["data"]} <= alice_ids
        assert _bobs_view(bob_sdk) == before
        admin_view = httpx.get(
            gateway.url + f"/admin/users/{bob.user_id}/completions", headers=ADMIN
        ).json()
        assert len(admin_view["data"]) == B_COUNT


def _bobs_view(client: OpenAI) -> list[tuple[str, Any, Any]]:
    return sorted(
        (c.id, c.metadata, c.choices[0].message.content)
        for c in client.chat.completions.list(limit=100)
    )


async def _recorded(history_dsn: str, count: int) -> list[Any]:
    db = HistoryDB(history_dsn)
    try:
        assert await db.wait_for("completions", count) == count
        return await db.completions()
    finally:
        await db.close()
