"""One batch of captured records written in one transaction, idempotently.

A record may be written twice (a retry after a lost commit acknowledgement, or two writers
replaying the same record): completions and request logs already present are skipped, and
messages and conversations are inserted only where their key is new, so a replay never
duplicates and concurrent writers storing one conversation neither collide nor lose rows.
Rows are sorted by key before every write, so two writers lock them in the same order.

A conversation's totals (completions, messages, tokens, last activity) are added in the
statement that inserts it, an upsert: a new conversation is written once, not inserted and
then updated. Where the database says which rows an INSERT added (PostgreSQL and SQLite:
``RETURNING``), the completions are inserted first and tell which records are new, and the
messages tell how many each conversation gained: three statements a batch. MySQL has no
``RETURNING``: there the new completions are looked up first, the upsert locks each
conversation's row, and the messages are then counted under that lock.

A turn's request resends its conversation so far. Where that history is stored, it is not
sent again: one lookup a batch says which records' history is (see ``_message_rows``), and
PostgreSQL locks their conversations before it, as deletion does.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import date
from typing import Any

import orjson
from sqlalchemy import (
    Table,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from capture.answers import conversation_key
from capture.chain import link
from capture.rows import COMPLETIONS, CONVERSATIONS, MESSAGES, Row, RowSet
from storage.schema import (
    DAILY,
    completions,
    conversations,
    history_metadata,
    latency_daily,
    messages,
    usage_daily,
)
from storage.usage import COUNTED, LATENCY_KEY, USAGE_KEY, Tally, tally

DayTable = Callable[[str, date], Table]
# What PostgreSQL says to a statement prepared against a table's row type that has changed
# since: a column added or dropped (datatype_mismatch), the table replaced by another of
# its name, as turning daily partitions on does (cannot_coerce).
STALE_ROW_TYPE = frozenset({"42804", "42846"})
TOTALS = ("completion_count", "message_count", "prompt_tokens", "completion_tokens", "total_tokens")


async def write_batch(
    connection: AsyncConnection, rowsets: Sequence[RowSet], day_table: DayTable | None = None
) -> int:
    """Write what is new in ``rowsets``; returns how many records were new. SQLite split
    by day needs ``day_table``: completions and request logs go straight to the table of
    their day (SQLite cannot upsert into the view over all days)."""
    rowsets = [rowset if rowset.nul_free else _without_nul(rowset) for rowset in rowsets]
    rowsets = _first_of_each(rowsets)
    if any(rowset.follows for rowset in rowsets):
        rowsets = await _join_followed(connection, rowsets)
    returning = connection.dialect.name != "mysql"
    completion_rows = [r.completion for r in rowsets if r.completion]
    others = _other_records(rowsets)
    new_others: dict[Table, set[str]] = {}
    if returning:
        new_ids = await _insert_new(connection, completions, completion_rows, day_table)
        for table, rows in others.items():
            new_others[table] = await _insert_new(connection, table, rows, day_table)
    else:
        new_ids = await _new_ids(connection, completions, completion_rows, day_table)
        for table, rows in others.items():
            new_others[table] = await _new_ids(connection, table, rows, day_table)
    fresh = [r for r in rowsets if r.completion and r.completion["id"] in new_ids]
    totals = _conversation_totals(fresh)
    if returning:
        locked = connection.dialect.name == "postgresql" and any(r.resent for r in fresh)
        if locked:
            await lock_conversations(connection, totals)
        message_rows = await _message_rows(connection, fresh)
        if message_rows:
            added = await _insert_messages(connection, message_rows, locked)
            for conversation_id, count in added.items():
                if conversation_id in totals:
                    totals[conversation_id]["message_count"] += count
        if totals:
            await _upsert_conversations(connection, totals)
    else:
        if totals:
            await _upsert_conversations(connection, totals)  # locks each row
        message_rows = await _message_rows(connection, fresh)
        if message_rows:
            await connection.execute(insert_ignore(connection, messages), message_rows)
        for table, rows, new in (
            (completions, completion_rows, new_ids),
            *((table, others[table], new_others[table]) for table in others),
        ):
            for target, some in _by_table(table, _unique(rows, ("id",)), day_table):
                if unseen := [row for row in some if row["id"] in new]:
                    await connection.execute(insert(target), unseen)
        if totals:
            await connection.execute(_RECOUNT, {"ids": sorted(totals)})
    if any(r.completion and r.completion.get("call_type") == "responses" for r in fresh):
        await settle_follow_ups(connection, fresh)
    await add_usage(connection, tally(r.completion for r in fresh if r.completion))
    return len(new_ids) + sum(map(len, new_others.values()))


def _first_of_each(rowsets: list[RowSet]) -> list[RowSet]:
    """The rowsets without a second of one record (a stream that took a record twice, an
    archive that holds it twice): counted twice, its conversation's totals and its day's
    usage would be too."""
    seen: set[str] = set()
    kept = []
    for rowset in rowsets:
        completion = rowset.completion
        if completion is not None:
            if completion["id"] in seen:
                continue
            seen.add(completion["id"])
        kept.append(rowset)
    return kept if len(kept) < len(rowsets) else rowsets


# Tables whose rows follow the rules above; a row of any other table is a record of its own
# (a request log, say), stored once per id.
_SHAPED = frozenset({COMPLETIONS, CONVERSATIONS, MESSAGES})


def _other_records(rowsets: Sequence[RowSet]) -> dict[Table, list[Row]]:
    """The rows of every table but the shaped ones, by table, tables in name order."""
    found: dict[str, list[Row]] = defaultdict(list)
    for rowset in rowsets:
        for name, rows in rowset.tables.items():
            if name not in _SHAPED:
                found[name].extend(rows)
    return {history_metadata.tables[name]: found[name] for name in sorted(found)}


async def _join_followed(connection: AsyncConnection, rowsets: Sequence[RowSet]) -> list[RowSet]:
    """Each record that follows up an earlier answer (``RowSet.follows``) moved into that
    answer's conversation, under its last message: the answer is found earlier in the
    batch, or stored. One found nowhere yet stays in the conversation its capture named
    after the answer, where the other follow-ups of that answer go too."""
    Where = tuple[str, str | None]  # an answer's conversation, and its last message
    wanted = {
        (rowset.completion["owner"], rowset.follows)
        for rowset in rowsets
        if rowset.follows and rowset.completion
    }
    found: dict[tuple[str, str], Where] = {}
    ids = sorted({answer for _, answer in wanted})
    c = completions.c
    for start in range(0, len(ids), LOOKUP_CHUNK):
        query = select(
            c.owner, c.response_id, c.conversation_id, c.request_hash, c.response_hash
        ).where(c.response_id.in_(ids[start : start + LOOKUP_CHUNK]))
        for row in await connection.execute(query):
            if (row.owner, row.response_id) in wanted:
                found[(row.owner, row.response_id)] = (
                    row.conversation_id,
                    row.response_hash or row.request_hash,
                )
    joined = []
    for rowset in rowsets:
        completion = rowset.completion
        if rowset.follows and completion:
            where = found.get((completion["owner"], rowset.follows))
            if where is not None:
                rowset = rowset.moved(where[0], where[1] or "")
                completion = rowset.completion
        if completion and completion.get("response_id"):
            found[(completion["owner"], completion["response_id"])] = (
                completion["conversation_id"],
                completion["response_hash"] or completion["request_hash"],
            )
        joined.append(rowset)
    return joined


async def settle_follow_ups(connection: AsyncConnection, fresh: Sequence[RowSet]) -> None:
    """Follow-ups and the responses they follow brought together, whichever was written
    first.

    A follow-up that found no response to join (``_join_followed``) went into the
    conversation its capture named after the response, ``conversation_key(owner,
    "previous", id)`` (with any follow-ups of its own). So the batch that writes a response
    looks for that conversation, and the batch that left a follow-up there looks again for
    its response; found (rarely), the waiting conversation moves under the response's last
    message (``_adopt``). Two writers doing each at once would not see each other's rows:
    on PostgreSQL both take a lock on the waiting conversation's key first, held to
    commit, so the second sees what the first wrote; on MySQL the lookups are locking
    reads, which wait for a row being written and see it once it is."""
    responses: dict[str, tuple[str, str | None]] = {}
    waiting: dict[str, tuple[str, str]] = {}
    for rowset in fresh:
        completion = rowset.completion
        if completion is None or completion.get("call_type") != "responses":
            continue
        if completion["response_id"]:
            named = conversation_key(completion["owner"], "previous", completion["response_id"])
            tail = completion["response_hash"] or completion["request_hash"]
            responses[named] = (completion["conversation_id"], tail)
        if rowset.follows:
            named = conversation_key(completion["owner"], "previous", rowset.follows)
            if completion["conversation_id"] == named:
                waiting[named] = (completion["owner"], rowset.follows)
    if not responses and not waiting:
        return
    mysql = connection.dialect.name == "mysql"
    if connection.dialect.name == "postgresql":
        locks = sorted({int(key[:15], 16) for key in (*responses, *waiting)})
        await connection.exec_driver_sql(_KEY_LOCKS, (locks,))
    keys = sorted(responses)
    found: list[str] = []
    for start in range(0, len(keys), LOOKUP_CHUNK):
        query = select(conversations.c.id).where(
            conversations.c.id.in_(keys[start : start + LOOKUP_CHUNK])
        )
        found.extend(
            (await connection.execute(query.with_for_update() if mysql else query)).scalars()
        )
    for early in sorted(found):
        target, tail = responses[early]
        if target != early:
            await _adopt(connection, early, target, tail)
    c = completions.c
    for early, (owner, answer) in sorted(waiting.items()):
        query = (
            select(c.conversation_id, c.request_hash, c.response_hash)
            .where(c.response_id == answer, c.owner == owner, c.call_type == "responses")
            .limit(1)
        )
        stored = (
            await connection.execute(query.with_for_update(read=True) if mysql else query)
        ).first()
        if stored is not None and stored.conversation_id != early:
            tail = stored.response_hash or stored.request_hash
            await _adopt(connection, early, stored.conversation_id, tail)


# PostgreSQL: locks on waiting conversations' keys (their first 60 bits), in order, to commit.
_KEY_LOCKS = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k"


async def _adopt(connection: AsyncConnection, early: str, target: str, tail: str | None) -> None:
    """Conversation ``early`` moved into ``target``, its chains hung under ``tail``."""
    await lock_conversations(connection, [early, target])
    m, c = messages.c, completions.c
    rows = [
        dict(row)
        for row in (await connection.execute(select(messages).where(m.conversation_id == early)))
        .mappings()
        .all()
    ]
    renamed = _rehung(rows, tail or "")
    moved = [
        {
            **row,
            "conversation_id": target,
            "hash": renamed[row["hash"]],
            "parent_hash": renamed.get(row["parent_hash"] or "", tail) or None,
        }
        for row in rows
    ]
    unique = _unique(moved, ("conversation_id", "hash"))
    gained: Any = conversations.c.message_count
    if connection.dialect.name == "mysql":  # no RETURNING: counted again below
        if unique:
            await connection.execute(insert_ignore(connection, messages), unique)
    elif unique:
        added = await _returning(connection, messages, unique, "conversation_id", "hash")
        gained = conversations.c.message_count + len(added)
    records = (
        await connection.execute(
            select(c.id, c.request_hash, c.response_hash).where(c.conversation_id == early)
        )
    ).all()
    for record in records:
        await connection.execute(
            update(completions)
            .where(c.id == record.id)
            .values(
                conversation_id=target,
                request_hash=renamed.get(record.request_hash or "", record.request_hash)
                or tail,  # a request that sent nothing new ends where it was hung
                response_hash=renamed.get(record.response_hash or "", record.response_hash),
            )
        )
    await connection.execute(delete(messages).where(m.conversation_id == early))
    before = (
        (await connection.execute(select(conversations).where(conversations.c.id == early)))
        .mappings()
        .one()
    )
    totals = {
        name: conversations.c[name] + before[name] for name in TOTALS if name != "message_count"
    }
    later = case(
        (conversations.c.updated_at < before["updated_at"], before["updated_at"]),
        else_=conversations.c.updated_at,
    )
    await connection.execute(
        update(conversations)
        .where(conversations.c.id == target)
        .values(
            **totals,
            message_count=gained,
            updated_at=later,
        )
    )
    if connection.dialect.name == "mysql":
        await connection.execute(_RECOUNT, {"ids": [target]})
    await connection.execute(delete(conversations).where(conversations.c.id == early))


def _rehung(rows: list[Row], tail: str) -> dict[str, str]:
    """Each message's new hash, its chain hung under ``tail``: its old hash linked to its
    new parent's, parents first (a message whose parent is not among ``rows`` is a root)."""
    children: dict[str, list[Row]] = defaultdict(list)
    hashes = {row["hash"] for row in rows}
    roots = []
    for row in rows:
        parent = row["parent_hash"]
        if parent in hashes:
            children[parent].append(row)
        else:
            roots.append(row)
    renamed: dict[str, str] = {}
    waiting = [(row, tail) for row in roots]
    while waiting:
        row, parent = waiting.pop()
        renamed[row["hash"]] = link(parent, row["hash"].encode())
        waiting.extend((child, renamed[row["hash"]]) for child in children[row["hash"]])
    return renamed


async def add_usage(connection: AsyncConnection, counted: Tally) -> None:
    """Add what ``counted`` sums (negative for completions deleted) to the usage by day;
    rows a deletion brings to nothing are removed."""
    usage_rows, latency_rows = counted.usage_rows(), counted.latency_rows()
    for table, rows, key, columns in (
        (usage_daily, usage_rows, USAGE_KEY, COUNTED),
        (latency_daily, latency_rows, LATENCY_KEY, ("count",)),
    ):
        if rows:
            await _upsert_adding(connection, table, rows, key, columns)
    if any(row["requests"] < 0 for row in usage_rows):
        days = sorted({row["day"] for row in usage_rows})
        await connection.execute(
            delete(usage_daily).where(usage_daily.c.day.in_(days), usage_daily.c.requests <= 0)
        )
        await connection.execute(
            delete(latency_daily).where(latency_daily.c.day.in_(days), latency_daily.c.count <= 0)
        )


async def _upsert_adding(
    connection: AsyncConnection,
    table: Table,
    rows: list[Row],
    key: tuple[str, ...],
    columns: tuple[str, ...],
    latest: str | None = None,
) -> None:
    """INSERT rows; where one's key is there already, add its ``columns`` to the stored
    ones, and keep the later of the two ``latest``."""
    name = connection.dialect.name
    if name == "postgresql":
        sets = [f'"{c}" = "{table.name}"."{c}" + EXCLUDED."{c}"' for c in columns]
        if latest:
            sets.append(f'"{latest}" = GREATEST("{table.name}"."{latest}", EXCLUDED."{latest}")')
        keys = ", ".join(f'"{k}"' for k in key)
        tail = f"ON CONFLICT ({keys}) DO UPDATE SET {', '.join(sets)}"
        await _unnest(connection, table, rows, tail)
        return
    statement = mysql.insert(table) if name == "mysql" else sqlite.insert(table)
    new = statement.inserted if isinstance(statement, mysql.Insert) else statement.excluded
    stored = table.c
    added: dict[str, Any] = {c: stored[c] + new[c] for c in columns}
    if latest:
        added[latest] = case((new[latest] > stored[latest], new[latest]), else_=stored[latest])
    if isinstance(statement, mysql.Insert):
        upsert: Insert = statement.on_duplicate_key_update(added)
    else:
        upsert = statement.on_conflict_do_update(index_elements=list(key), set_=added)
    await connection.execute(upsert, rows)


async def _upsert_conversations(connection: AsyncConnection, totals: dict[str, Row]) -> None:
    """Each conversation inserted with its totals, or its totals added to those stored."""
    rows = [totals[key] for key in sorted(totals)]
    await _upsert_adding(connection, conversations, rows, ("id",), TOTALS, latest="updated_at")


def _without_nul(rowset: RowSet) -> RowSet:
    """PostgreSQL's text cannot hold NUL (a client may send one in any field): it is dropped
    from plain text columns on every backend alike. JSON columns hold it escaped. Whether a
    record has one at all is asked of its rows as JSON, where orjson writes NUL as
    ``\\u0000``: one pass in C over a few KB, far cheaper for the writer than a look at
    each value (a string holding those six characters only costs a closer look)."""
    rows = [row for some in rowset.tables.values() for row in some]
    try:
        if b"\\u0000" not in orjson.dumps(rows, default=str):
            return rowset
    except orjson.JSONEncodeError:  # an integer past 64 bits, say: look at every value
        pass

    def clean(row: Row) -> Row:
        return {k: v.replace("\x00", "") if isinstance(v, str) else v for k, v in row.items()}

    tables = {name: [clean(row) for row in rows] for name, rows in rowset.tables.items()}
    return RowSet(tables, resent=rowset.resent, follows=rowset.follows)


async def _message_rows(connection: AsyncConnection, fresh: list[RowSet]) -> list[Row]:
    """The message rows to send: each record's, but the history it resent where that is
    stored already. A chat client resends the whole conversation every turn (at turn 40,
    80 messages of ~1 KB a record), which cost the writer and the database several times
    what the turn's own rows did. A stored message's history is stored (``_tidy`` deletes
    no message that a kept one follows), so one lookup a record, of the last message it
    resent, says whether all of them are. The conversations are locked first (by the
    MySQL upsert, or ``lock_conversations``), as deletion locks them: what is found stays
    until the batch commits."""
    stored: set[tuple[str, str]] = set()
    keys = sorted({_key(r.messages[r.resent - 1]) for r in fresh if r.resent})
    if keys and connection.dialect.name == "postgresql":
        columns = ([c for c, _ in keys], [h for _, h in keys])
        stored.update(map(tuple, await connection.exec_driver_sql(_STORED, columns)))
    else:  # pairs ORed: SQLite scans the table for "(a, b) IN (...)", not for this
        mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
        pair = f"(conversation_id = {mark} AND hash = {mark})"
        for start in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[start : start + LOOKUP_CHUNK]
            found = await connection.exec_driver_sql(
                _STORED_PAIRS + " OR ".join([pair] * len(chunk)),
                tuple(value for key in chunk for value in key),
            )
            stored.update(map(tuple, found))

    def unsent(rowset: RowSet) -> list[Row]:
        resent = rowset.resent
        if resent and _key(rowset.messages[resent - 1]) in stored:
            return rowset.messages[resent:]
        return rowset.messages

    return _unique((m for r in fresh for m in unsent(r)), ("conversation_id", "hash"))


async def _insert_messages(
    connection: AsyncConnection, rows: list[Row], locked: bool
) -> Counter[str]:
    """Insert the messages whose key is new; how many each conversation gained.

    On PostgreSQL, a message found stored (and so skipped) may yet be deleted before this
    batch commits, by a deletion that cannot see the batch's completions: this completion
    would then point at a message that is gone. Unless their conversations were locked
    before, those found stored are inserted again once they are, as deletion locks them:
    nothing then, unless a deletion had taken them meanwhile. Without resent history,
    found stored means a conversation its client names (``X-Conversation-Id``), or a first
    request asked again and answered the same: rare."""
    added = await _returning(connection, messages, rows, "conversation_id", "hash")
    gained = Counter(conversation_id for conversation_id, _ in added)
    if locked or len(added) == len(rows) or connection.dialect.name != "postgresql":
        return gained  # SQLite: the batch holds the only write lock there is
    inserted = set(map(tuple, added))
    skipped = [row for row in rows if _key(row) not in inserted]
    await lock_conversations(connection, {row["conversation_id"] for row in skipped})
    again = await _returning(connection, messages, skipped, "conversation_id", "hash")
    gained.update(conversation_id for conversation_id, _ in again)
    return gained


_key = operator.itemgetter("conversation_id", "hash")  # a message row's key


async def lock_conversations(connection: AsyncConnection, ids: Iterable[str]) -> None:
    """Lock the stored conversations among ``ids``, in key order, for the rest of the
    transaction: deletion takes them so, and the writer where it relies on what it found
    stored, so each waits for the other. SQLite has no row locks, and one writer at a time."""
    keys = sorted(ids)
    name = connection.dialect.name
    if name == "postgresql":
        await connection.exec_driver_sql(_LOCK, (keys,))
    elif name != "sqlite":
        await connection.execute(
            select(conversations.c.id)
            .where(conversations.c.id.in_(keys))
            .order_by(conversations.c.id)
            .with_for_update()
        )


_STORED = (
    "SELECT m.conversation_id, m.hash FROM unnest($1::text[], $2::text[]) AS k(c, h) "
    "JOIN messages AS m ON m.conversation_id = k.c AND m.hash = k.h"
)
# Elsewhere the pairs in SQL text: as SQLAlchemy expressions, their clauses cost the writer
# more to build and compile than the lookup itself, a new statement for each count of pairs.
_STORED_PAIRS = "SELECT conversation_id, hash FROM messages WHERE "
_LOCK = "SELECT 1 FROM conversations WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
LOOKUP_CHUNK = 400  # pairs a lookup: two bound values each, well under every driver's limit


async def _insert_new(
    connection: AsyncConnection, table: Table, rows: list[Row], day_table: DayTable | None
) -> set[str]:
    """Insert the rows whose id is new; the ids inserted."""
    new: set[str] = set()
    for target, some in _by_table(table, _unique(rows, ("id",)), day_table):
        new.update(row[0] for row in await _returning(connection, target, some, "id"))
    return new


async def _returning(
    connection: AsyncConnection, table: Table, rows: list[Row], *columns: str
) -> list[Any]:
    """INSERT the rows whose key is new; ``columns`` of each row inserted."""
    if connection.dialect.name == "postgresql":
        listed = ", ".join(f'"{column}"' for column in columns)
        return await _unnest(connection, table, rows, f"ON CONFLICT DO NOTHING RETURNING {listed}")
    statement = insert_ignore(connection, table).returning(*(table.c[c] for c in columns))
    return list((await connection.execute(statement, rows)).all())


class StaleRowType(Exception):
    """A table's row type changed since the connection prepared a statement with it
    (asyncpg keeps each type's fields, and statements, per connection): a newer gateway's
    migration added a column, or another gateway turned daily partitions on. The
    connection is dropped; the batch goes through on a new one."""


async def _unnest(
    connection: AsyncConnection, table: Table, rows: list[Row], tail: str
) -> list[Any]:
    """PostgreSQL: many rows INSERTed as one array of the table's own row type, unnested by
    the server. The statement's text is the same for any number of rows, so it is prepared
    once; asyncpg encodes each row from its dict, by the names of the row type's fields.
    (One array per column cost asyncpg a check against three ABCs per value, a third of the
    writer's client CPU; SQLAlchemy's own VALUES lists cost more still.)"""
    by_columns: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for row in rows:
        by_columns[tuple(row)].append(row)  # rows of one table all have the same keys, or
    returned: list[Any] = []  # nearly (a message whose content was dropped has one more)
    for columns, some in by_columns.items():
        sql = _unnest_sql(table.name, columns, tail)
        try:
            result = await connection.exec_driver_sql(sql, (some,))
        except DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) not in STALE_ROW_TYPE:
                raise
            await connection.invalidate()  # a new connection prepares the statement anew
            raise StaleRowType(f"{table.name}: {error.orig}") from error
        if result.returns_rows:
            returned.extend(result.all())
    return returned


@functools.cache
def _unnest_sql(table: str, columns: tuple[str, ...], tail: str) -> str:
    listed = ", ".join(f'"{name}"' for name in columns)
    return f'INSERT INTO "{table}" ({listed}) SELECT {listed} FROM unnest($1::"{table}"[]) {tail}'


async def _new_ids(
    connection: AsyncConnection, table: Table, rows: list[Row], day_table: DayTable | None
) -> set[str]:
    """The ids of ``rows`` not stored yet."""
    existing: set[str] = set()
    for source, some in _by_table(table, rows, day_table):
        ids = [row["id"] for row in some]
        found = await connection.execute(select(source.c.id).where(source.c.id.in_(ids)))
        existing.update(found.scalars())
    return {row["id"] for row in rows} - existing


def _by_table(
    table: Table, rows: list[Row], day_table: DayTable | None
) -> list[tuple[Table, list[Row]]]:
    """``rows`` with the table each goes to: ``table``, or its day's."""
    if not rows:
        return []
    if day_table is None or table not in DAILY:
        return [(table, rows)]
    by_day: dict[date, list[Row]] = defaultdict(list)
    for row in rows:
        by_day[row["started_at"].date()].append(row)
    return [(day_table(table.name, day), by_day[day]) for day in sorted(by_day)]


def _unique(rows: Any, key: tuple[str, ...]) -> list[Row]:
    """The first row of each key, in key order."""
    by_key: dict[Any, Row] = {}
    key_of = operator.itemgetter(*key)  # a value for one name, a tuple for several
    for row in rows:
        by_key.setdefault(key_of(row), row)
    return [by_key[k] for k in sorted(by_key)]


def insert_ignore(connection: AsyncConnection, table: Table) -> Insert:
    """INSERT that skips rows whose primary key is already there, in each dialect's words."""
    name = connection.dialect.name
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    statement = mysql.insert(table)
    first_key = table.primary_key.columns.values()[0].name
    return statement.on_duplicate_key_update({first_key: statement.inserted[first_key]})


def _conversation_totals(fresh: list[RowSet]) -> dict[str, Row]:
    """Each conversation of the new records, as first seen, with what they add to it."""
    totals: dict[str, Row] = {}
    for rowset in fresh:
        row, completion = rowset.conversation, rowset.completion
        if row is None or completion is None:
            continue
        entry = totals.get(row["id"])
        if entry is None:
            entry = totals[row["id"]] = {**row, **dict.fromkeys(TOTALS, 0)}
        entry["completion_count"] += 1
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            entry[name] += completion[name] or 0
        if completion["started_at"] > entry["updated_at"]:
            entry["updated_at"] = completion["started_at"]
    return totals


# MySQL: the conversations' messages counted under the row locks their upsert took, so the
# counts include what a writer before this one added; one statement for a batch's
# conversations (an executemany of UPDATE is a round trip a row).
_RECOUNT = (
    update(conversations)
    .where(conversations.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        message_count=select(func.count())
        .select_from(messages)
        .where(messages.c.conversation_id == conversations.c.id)
        .scalar_subquery()
    )
)
