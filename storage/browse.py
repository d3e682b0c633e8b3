"""Finding completions and conversations: filters, keyset pages, and whole requests rebuilt.

Every function takes a ``Scope`` (see ``storage/scope.py``). Pages are keyset pages on
(time, id): stable while rows are added, and ``has_more`` is exact (one row more is read
than is returned).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson
from sqlalchemy import ColumnElement, and_, cast, exists, false, func, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Select

from capture.message_rows import stored_message
from capture.messages import MARKS, with_marks
from storage.partitions import first_part_end
from storage.schema import completions, conversations, messages, request_logs
from storage.scope import Scope, storable

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class CompletionFilter:
    model: str | None = None  # requested or returned
    since: datetime | None = None
    until: datetime | None = None
    status: int | None = None
    errors_only: bool = False
    answered_only: bool = False  # a 2xx answer: what OpenAI's stored-completions API lists
    conversation_id: str | None = None
    tool: str | None = None  # a tool the answer called
    call_type: str | None = None  # chat, responses, embeddings, completions
    upstream: str | None = None  # the one that answered, as UPSTREAMS names it
    metadata: dict[str, str] = field(default_factory=dict)


RECENT = timedelta(days=1)
_NOT_FOR_ORDER = (
    "IGNORE INDEX FOR ORDER BY (ix_completions_started, ix_completions_owner_started_id)"
)


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[RowMapping]
    has_more: bool


def public_id(row: RowMapping) -> str:
    """The id a client knows a completion by: the upstream's ``chatcmpl-...`` id."""
    return str(row["response_id"] or row["id"])


async def find_completion(
    connection: AsyncConnection, scope: Scope, completion_id: str, call_type: str | None = None
) -> RowMapping | None:
    """One of the scope's completions (of ``call_type``, if given), by the upstream's id or
    the gateway's record id."""
    if not storable(completion_id):
        return None
    kind = [] if call_type is None else [completions.c.call_type == call_type]
    query = (
        select(completions)
        .where(
            scope.where(completions),
            or_(completions.c.response_id == completion_id, completions.c.id == completion_id),
            *kind,
        )
        .order_by(completions.c.started_at.desc(), completions.c.id.desc())
        .limit(1)
    )
    return (await connection.execute(query)).mappings().first()


async def list_completions(
    connection: AsyncConnection,
    scope: Scope,
    filters: CompletionFilter,
    *,
    limit: int,
    after: RowMapping | None = None,
    descending: bool = True,
) -> Page:
    query = select(completions).where(
        scope.where(completions), *_completion_conditions(connection, filters)
    )
    if filters.errors_only:
        # Errors are few: MySQL and MariaDB would walk a newest-first index through every
        # completion to find them (360 ms for 100,000 without an error); scanning and
        # sorting the few found takes 37 ms.
        query = query.with_hint(completions, _NOT_FOR_ORDER, "mysql")
    if descending and filters.since is None:
        # The newest page first from the last day alone: split by day, PostgreSQL plans that
        # over a partition or two instead of all of them (1,000,000 completions over 232
        # days: planning 17.7 ms of a 20 ms query). Enough rows there make the page.
        end = after["started_at"] if after is not None else datetime.now(UTC).replace(tzinfo=None)
        recent = query.where(completions.c.started_at >= end - RECENT)
        page = await _page(connection, recent, completions, "started_at", limit, after, True)
        if page.has_more:
            return page
        if not page.rows and not await _has_history(connection, scope):
            # A user with no history at all: asked of conversations (not split by day),
            # without planning every day's partition (232 days: 25.6 ms).
            return page
    if not descending and filters.until is None:
        # The oldest page first from the oldest day alone, for the same reason; there, the
        # days before the cursor's are done with, and the first page starts where the
        # oldest part of the table does (partitions know that; a query would plan them all).
        if after is not None:
            until: datetime | None = after["started_at"] + RECENT
        else:
            until = await first_part_end(connection, completions.name)
        if until is not None:
            early = query.where(completions.c.started_at < until)
            page = await _page(connection, early, completions, "started_at", limit, after, False)
            if page.has_more:
                return page
    return await _page(connection, query, completions, "started_at", limit, after, descending)


async def _has_history(connection: AsyncConnection, scope: Scope) -> bool:
    """Whether the scope's owner has any conversation (every completion is in one)."""
    if scope.all_owners:
        return True
    query = select(exists().where(scope.where(conversations)))
    return bool(await connection.scalar(query))


async def find_conversation(
    connection: AsyncConnection, scope: Scope, conversation_id: str
) -> RowMapping | None:
    if not storable(conversation_id):
        return None
    query = select(conversations).where(
        scope.where(conversations), conversations.c.id == conversation_id
    )
    return (await connection.execute(query)).mappings().first()


async def list_conversations(
    connection: AsyncConnection,
    scope: Scope,
    filters: CompletionFilter,
    *,
    limit: int,
    after: RowMapping | None = None,
    descending: bool = True,
) -> Page:
    """Conversations, latest activity first, that hold a completion matching ``filters``.
    Those of embeddings (a call's inputs, a conversation each) only when asked for."""
    query = select(conversations).where(scope.where(conversations))
    if filters.call_type is None:
        query = query.where(conversations.c.call_type != "embeddings")
    if filters.since is not None:
        query = query.where(conversations.c.updated_at >= filters.since)
    if filters.until is not None:
        query = query.where(conversations.c.created_at < filters.until)
    conditions = _completion_conditions(connection, filters, time=False)
    if conditions:
        query = query.where(
            exists().where(completions.c.conversation_id == conversations.c.id, *conditions)
        )
    return await _page(connection, query, conversations, "updated_at", limit, after, descending)


async def conversation_messages(connection: AsyncConnection, conversation_id: str) -> list[JSON]:
    """Every message of a conversation's tree, oldest first: hash, parent, role, message.

    Callers check the conversation is in scope first (``find_conversation``).
    """
    query = (
        select(messages)
        .where(messages.c.conversation_id == conversation_id)
        .order_by(messages.c.created_at, messages.c.hash)
    )
    return [
        {
            "id": row["hash"],
            "parent_id": row["parent_hash"],
            "role": row["role"],
            "created_at": row["created_at"],
            "message": stored_message(row),
        }
        for row in (await connection.execute(query)).mappings()
    ]


class Rebuilder:
    """Rebuilds many requests at once: each conversation's messages are read once, so a page
    of a thousand completions costs a query per conversation, not one per completion."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection  # what ``load`` reads with (another, for another page)
        self._trees: dict[str, dict[str, tuple[str | None, Any]]] = {}
        self._conversations: dict[str, RowMapping] = {}

    async def load(self, conversation_ids: Iterable[str], *, with_rows: bool = False) -> None:
        """Read these conversations' messages (and, ``with_rows``, their rows)."""
        wanted = sorted(set(conversation_ids) - set(self._trees))
        for start in range(0, len(wanted), 200):
            chunk = wanted[start : start + 200]
            for conversation_id in chunk:
                self._trees[conversation_id] = {}
            query = select(messages).where(messages.c.conversation_id.in_(chunk))
            for row in (await self.connection.execute(query)).mappings():
                tree = self._trees[row["conversation_id"]]
                tree[row["hash"]] = (row["parent_hash"], stored_message(row))
            if with_rows:
                query = select(conversations).where(conversations.c.id.in_(chunk))
                for row in (await self.connection.execute(query)).mappings():
                    self._conversations[row["id"]] = row

    def holds(self, conversation_id: str, digest: str | None) -> bool:
        """Whether the message ``digest`` (none: trivially) of a loaded conversation is
        held."""
        return digest is None or digest in self._trees.get(conversation_id, {})

    @property
    def loaded(self) -> int:
        """How many conversations' messages are held."""
        return len(self._trees)

    def conversation(self, conversation_id: str) -> RowMapping | None:
        """A conversation's row, if ``load`` read it."""
        return self._conversations.get(conversation_id)

    def forget(self) -> None:
        self._trees.clear()
        self._conversations.clear()

    def chain(self, conversation_id: str, tail: str | None) -> list[Any]:
        tree = self._trees[conversation_id]
        ordered = []
        while tail:
            if tail not in tree:
                raise LookupError(f"conversation {conversation_id}: message {tail} is missing")
            parent, message = tree[tail]
            ordered.append(message)
            tail = parent
        ordered.reverse()
        return ordered

    def request(self, row: RowMapping) -> list[Any]:
        """The request's messages (or Responses input items), as sent: the last
        ``request_message_count`` of its chain. A chat request sends its whole chain; a
        Responses request that follows up an earlier answer sends only what is new; an
        Anthropic request gets its cache markers back (``capture/messages.py``)."""
        sent = last(
            self.chain(row["conversation_id"], row["request_hash"]), row["request_message_count"]
        )
        if row["call_type"] == "messages" and row["params"] and MARKS in row["params"]:
            sent = with_marks(sent, orjson.loads(row["params"]).get(MARKS))
        return sent

    def answer(self, row: RowMapping) -> Any:
        """The assistant's message (the first choice); for a Responses call, its output
        items, in order: the chain from the request's last item to the answer's."""
        tree = self._trees[row["conversation_id"]]
        if row["call_type"] == "responses":
            items, tail = [], row["response_hash"]
            while tail and tail != row["request_hash"] and tail in tree:
                parent, item = tree[tail]
                items.append(item)
                tail = parent
            items.reverse()
            return items
        found = tree.get(row["response_hash"] or "")
        return None if found is None else found[1]


def rebuilt(rebuilder: Rebuilder, row: RowMapping, *, context: bool = False) -> Rebuilt:
    """``row`` rebuilt from what ``rebuilder`` loaded."""
    conversation_id = row["conversation_id"]
    return Rebuilt(
        row,
        rebuilder.chain(conversation_id, row["request_hash"])
        if context
        else rebuilder.request(row),
        rebuilder.answer(row),
        rebuilder.conversation(conversation_id),
    )


def last(chain: list[Any], count: int) -> list[Any]:
    return chain[len(chain) - count :] if 0 <= count < len(chain) else chain


class Rebuilt(NamedTuple):
    """A completion with its request and answer rebuilt, and its conversation's row."""

    row: RowMapping
    request: list[Any]
    answer: Any
    conversation: RowMapping | None


async def iter_completions(
    engine: AsyncEngine,
    scope: Scope,
    filters: CompletionFilter,
    page_size: int = 500,
    *,
    context: bool = False,
) -> AsyncIterator[Rebuilt]:
    """Every matching completion, oldest first, with its request and answer rebuilt: a page
    at a time, each page read on a connection of its own, so that exporting a million rows
    holds one page in memory and no transaction open for long. With ``context``, the
    request is its whole chain: for a Responses follow-up, what came before it too."""
    after: RowMapping | None = None
    while True:
        async with engine.connect() as connection:
            page = await list_completions(
                connection, scope, filters, limit=page_size, after=after, descending=False
            )
            rebuilder = Rebuilder(connection)
            await rebuilder.load((row["conversation_id"] for row in page.rows), with_rows=True)
            items = [rebuilt(rebuilder, row, context=context) for row in page.rows]
        for item in items:
            yield item
        if not page.has_more:
            return
        after = page.rows[-1]


def _completion_conditions(
    connection: AsyncConnection, filters: CompletionFilter, time: bool = True
) -> list[ColumnElement[bool]]:
    c = completions.c
    texts = [
        filters.model,
        filters.conversation_id,
        filters.tool,
        filters.call_type,
        filters.upstream,
        *filters.metadata.items(),
    ]
    if not all(
        storable(t) for item in texts for t in (item if isinstance(item, tuple) else [item])
    ):
        return [false()]  # nothing stored holds NUL, and PostgreSQL refuses to be asked
    conditions: list[ColumnElement[bool]] = []
    if filters.model is not None:
        conditions.append(
            or_(c.requested_model == filters.model, c.response_model == filters.model)
        )
    if time and filters.since is not None:
        conditions.append(c.started_at >= filters.since)
    if time and filters.until is not None:
        conditions.append(c.started_at < filters.until)
    if filters.status is not None:
        conditions.append(c.status_code == filters.status)
    if filters.errors_only:
        conditions.append(c.status_code >= 400)
    if filters.answered_only:
        conditions.append(and_(c.status_code >= 200, c.status_code < 300))
    if filters.conversation_id is not None:
        conditions.append(c.conversation_id == filters.conversation_id)
    if filters.call_type is not None:
        conditions.append(c.call_type == filters.call_type)
    if filters.upstream is not None:
        conditions.append(c.upstream == filters.upstream)
    if filters.tool is not None:
        needle = '"name":' + _json_string(filters.tool)
        conditions.append(
            exists().where(
                messages.c.conversation_id == c.conversation_id,
                messages.c.hash == c.response_hash,
                messages.c.body.contains(needle, autoescape=True),
            )
        )
    for key, value in sorted(filters.metadata.items()):
        conditions.append(json_text(connection, c.metadata, key) == value)
    return conditions


@dataclass(frozen=True, slots=True)
class LogFilter:
    """Which request logs: every proxied ``/v1`` request the gateway did not capture whole
    (``GET /v1/models``, stored responses, files, ...)."""

    path: str | None = None  # the path, or its beginning when it ends in "*"
    method: str | None = None
    status: int | None = None
    errors_only: bool = False
    since: datetime | None = None
    until: datetime | None = None


async def find_request_log(
    connection: AsyncConnection, scope: Scope, log_id: str
) -> RowMapping | None:
    if not storable(log_id):
        return None
    query = select(request_logs).where(scope.where(request_logs), request_logs.c.id == log_id)
    return (await connection.execute(query)).mappings().first()


async def list_request_logs(
    connection: AsyncConnection,
    scope: Scope,
    filters: LogFilter,
    *,
    limit: int,
    after: RowMapping | None = None,
    descending: bool = True,
) -> Page:
    c = request_logs.c
    if not storable(filters.path) or not storable(filters.method):
        return Page(rows=[], has_more=False)
    query = select(request_logs).where(scope.where(request_logs))
    if filters.path is not None and filters.path.endswith("*"):
        query = query.where(c.path.startswith(filters.path[:-1], autoescape=True))
    elif filters.path is not None:
        query = query.where(c.path == filters.path)
    if filters.method is not None:
        query = query.where(c.method == filters.method.upper())
    if filters.status is not None:
        query = query.where(c.status_code == filters.status)
    if filters.errors_only:
        query = query.where(c.status_code >= 400)
    if filters.since is not None:
        query = query.where(c.started_at >= filters.since)
    if filters.until is not None:
        query = query.where(c.started_at < filters.until)
    return await _page(connection, query, request_logs, "started_at", limit, after, descending)


def json_text(connection: AsyncConnection, column: Any, key: str) -> ColumnElement[Any]:
    """The string at ``key`` of a JSON object stored as text, in each dialect's words."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        return cast(column, JSONB).op("->>")(key)
    path = "$." + _json_string(key)
    if dialect == "sqlite":
        return func.json_extract(column, path)
    return func.json_unquote(func.json_extract(column, path))


def _json_string(value: str) -> str:
    return orjson.dumps(value).decode()


async def _page(
    connection: AsyncConnection,
    query: Select[Any],
    table: Any,
    time_column: str,
    limit: int,
    after: RowMapping | None,
    descending: bool,
) -> Page:
    moment, key = table.c[time_column], table.c.id
    if after is not None:
        position = (after[time_column], after["id"])
        if descending:
            query = query.where(
                or_(moment < position[0], and_(moment == position[0], key < position[1]))
            )
        else:
            query = query.where(
                or_(moment > position[0], and_(moment == position[0], key > position[1]))
            )
    order = (moment.desc(), key.desc()) if descending else (moment.asc(), key.asc())
    rows = list((await connection.execute(query.order_by(*order).limit(limit + 1))).mappings())
    return Page(rows=rows[:limit], has_more=len(rows) > limit)
