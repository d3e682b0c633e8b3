"""Search, on every backend: a phrase is found whatever the case of its ASCII letters,
and ``%`` and ``_`` in it are letters, not wildcards."""

from __future__ import annotations

import asyncio

from storage.scope import Scope
from storage.search import search
from tests import bulk
from tests.history_db import migrated


def test_a_phrase_is_found_in_any_case_and_its_wildcards_are_letters(history_dsn: str) -> None:
    async def check() -> None:
        async with migrated(history_dsn) as engine:
            planted = await bulk.fill(engine, 40)
            english = {f"bulk-{bulk.OWNER}-{i:08d}" for i in planted["english"]}
            chinese = {f"bulk-{bulk.OWNER}-{i:08d}" for i in planted["chinese"]}
            async with engine.connect() as connection:

                async def found(scope: Scope, phrase: str) -> set[str]:
                    hits, _ = await search(connection, scope, phrase, limit=50)
                    return {hit.conversation_id for hit in hits}

                everyone, owner = Scope.everyone(), Scope.of(bulk.OWNER)
                assert await found(everyone, "QUARTERLY Llama migration") == english
                assert await found(owner, "quarterly LLAMA") == english
                assert await found(everyone, "量子计算机") == chinese
                assert await found(everyone, "quarterly%migration") == set()
                assert await found(everyone, "quarterly_llama") == set()
                assert await found(Scope.of("someone else"), "quarterly") == set()

    asyncio.run(check())
