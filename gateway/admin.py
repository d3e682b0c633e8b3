"""The admin API under ``/admin``: users and keys, everyone's history, search, statistics,
export, deletion and the audit log. Every route needs ``GATEWAY_ADMIN_KEY`` (as a Bearer
token); with it unset the API answers 403. Its OpenAPI schema is ``/admin/openapi.json``.

Routes that read one user's history build that user's scope (``Scope.of``); only the
routes that are about everyone (statistics and search without a user, export without a
user, prune) build ``Scope.everyone()``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException

from capture.exchange import attempts_of
from gateway import admin_models as m
from gateway.auth import presented_key
from gateway.completion_objects import fine_tuning_example
from gateway.errors import (
    DATABASE_TROUBLE,
    ArchiveUnwritable,
    Forbidden,
    GatewayError,
    InvalidGatewayKey,
    InvalidRequest,
    NotFound,
    database_error,
    json_error,
)
from gateway.services import services
from gateway.stored_completions import has_nul
from storage import accounts, browse, deletion, erasures, exports, retention, search, stats
from storage.archive import ArchiveFailed
from storage.browse import CompletionFilter
from storage.exports import stored_json
from storage.schema import conversations
from storage.scope import Scope

MAX_LIMIT = 1000


async def admin_actor(request: Request) -> str:
    settings = services(request).settings
    if not settings.gateway_admin_key:
        raise Forbidden("The admin API is off: set GATEWAY_ADMIN_KEY.", code="admin_disabled")
    key = presented_key(request.headers.get("authorization"), request.headers.get("api-key"))
    if key is None or not hmac.compare_digest(key.encode(), settings.gateway_admin_key.encode()):
        raise InvalidGatewayKey("Incorrect or missing admin key.")
    if has_nul(request):
        raise InvalidRequest("NUL characters are not allowed in paths or queries.", code="invalid")
    return "admin"


Actor = Annotated[str, Depends(admin_actor)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": m.ErrorResponse} for status in (400, 401, 403, 404)
}
router = APIRouter(responses=ERRORS)


def _main(request: Request) -> AsyncEngine:
    return services(request).main_engine


def _history(request: Request) -> AsyncEngine:
    return services(request).history_engine


def _reader(request: Request) -> AsyncEngine:
    """Where history is read: a replica, if there is one (``MES_SQL_READ_DSN``)."""
    return services(request).history_reader


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def _scope_of(user_id: str | None) -> Scope:
    """One user's history, or, with no ``user_id``, everyone's: the admin API has checked
    GATEWAY_ADMIN_KEY."""
    return Scope.of(user_id) if user_id else Scope.everyone()


def _page(items: list[Any], has_more: bool, key: str = "id") -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": str(items[0][key]) if items else None,
        "last_id": str(items[-1][key]) if items else None,
        "has_more": has_more,
    }


# -- users and keys -----------------------------------------------------------------------


def _plain(row: RowMapping) -> dict[str, Any]:
    """A row as a dict with plain ``str`` keys (SQLAlchemy's are a subclass orjson refuses)."""
    return {str(key): value for key, value in row.items()}


def _user(row: RowMapping) -> dict[str, Any]:
    return {**_plain(row), "metadata": stored_json(row["metadata"])}


@router.post("/users", response_model=m.User, status_code=201)
async def create_user(body: m.UserCreate, request: Request, actor: Actor) -> dict[str, Any]:
    async with _main(request).begin() as connection:
        row = await accounts.create_user(connection, body.name, body.email, body.metadata)
        await accounts.audit(connection, actor, "user.created", row["id"], {"name": body.name})
    return _user(row)


@router.get("/users", response_model=m.ListOf[m.User])
async def list_users(
    request: Request, actor: Actor, limit: Limit = 100, after: str | None = None
) -> dict[str, Any]:
    async with _main(request).connect() as connection:
        rows = await accounts.list_users(connection, limit + 1, after)
    return _page([_user(r) for r in rows[:limit]], len(rows) > limit)


@router.get("/users/{user_id}", response_model=m.User)
async def get_user(user_id: str, request: Request, actor: Actor) -> dict[str, Any]:
    async with _main(request).connect() as connection:
        row = await accounts.user(connection, user_id)
    if row is None:
        raise NotFound(f"No user '{user_id}'.")
    return _user(row)


@router.patch("/users/{user_id}", response_model=m.User)
async def update_user(
    user_id: str, body: m.UserUpdate, request: Request, actor: Actor
) -> dict[str, Any]:
    """Change a user's name, email or metadata: the fields sent, and only those."""
    changes = body.model_dump(include=body.model_fields_set)
    async with _main(request).begin() as connection:
        row = await accounts.update_user(connection, user_id, changes)
        if row is None:
            raise NotFound(f"No user '{user_id}'.")
        fields = {"fields": sorted(changes)}  # which, not what: erasing the user erases all
        await accounts.audit(connection, actor, "user.updated", user_id, fields)
    return _user(row)


@router.delete("/users/{user_id}", response_model=m.UserErased)
async def erase_user(user_id: str, request: Request, actor: Actor) -> dict[str, Any]:
    """Erase a user: their history (and what the by-day tables count of it), their keys,
    name, email and metadata. The audit log keeps that a user was erased, not who."""
    async with _main(request).begin() as connection:  # first, no more requests of theirs
        if not await accounts.set_disabled(connection, user_id, True):
            raise NotFound(f"No user '{user_id}'.")
    services(request).authenticator.forget_all()
    async with _history(request).begin() as connection:  # then none of their records after
        await erasures.erase_owner(connection, user_id)
    async with _history(request).begin() as connection:
        deleted = await deletion.delete_owner_history(connection, Scope.of(user_id))
    async with _main(request).begin() as connection:
        if not await accounts.erase_user(connection, user_id):
            raise NotFound(f"No user '{user_id}'.")
        await accounts.audit(connection, actor, "user.erased", accounts.ERASED, _counts(deleted))
    services(request).authenticator.forget_all()
    return {"id": user_id, "erased": True, "history": deleted}


async def _set_disabled(request: Request, actor: str, user_id: str, disabled: bool) -> Any:
    async with _main(request).begin() as connection:
        if not await accounts.set_disabled(connection, user_id, disabled):
            raise NotFound(f"No user '{user_id}'.")
        action = "user.disabled" if disabled else "user.enabled"
        await accounts.audit(connection, actor, action, user_id)
        row = await accounts.user(connection, user_id)
    authenticator = services(request).authenticator
    authenticator.forget_all()
    assert row is not None
    return _user(row)


@router.post("/users/{user_id}/disable", response_model=m.User)
async def disable_user(user_id: str, request: Request, actor: Actor) -> dict[str, Any]:
    """Disable a user: every key of theirs stops working (in other gateway processes within
    seconds)."""
    result: dict[str, Any] = await _set_disabled(request, actor, user_id, True)
    return result


@router.post("/users/{user_id}/enable", response_model=m.User)
async def enable_user(user_id: str, request: Request, actor: Actor) -> dict[str, Any]:
    result: dict[str, Any] = await _set_disabled(request, actor, user_id, False)
    return result


@router.post("/users/{user_id}/keys", response_model=m.IssuedKey, status_code=201)
async def issue_key(
    user_id: str, body: m.KeyCreate, request: Request, actor: Actor
) -> dict[str, Any]:
    async with _main(request).begin() as connection:
        if await accounts.user(connection, user_id) is None:
            raise NotFound(f"No user '{user_id}'.")
        key, row = await accounts.issue_key(connection, user_id, body.name)
        await accounts.audit(connection, actor, "key.issued", row["id"], {"user_id": user_id})
    return {**row, "key": key}


@router.get("/users/{user_id}/keys", response_model=m.ListOf[m.Key])
async def list_keys(user_id: str, request: Request, actor: Actor) -> dict[str, Any]:
    async with _main(request).connect() as connection:
        rows = await accounts.list_keys(connection, user_id)
    return _page([dict(r) for r in rows], False)


@router.post("/keys/{key_id}/revoke", response_model=m.Key)
async def revoke_key(key_id: str, request: Request, actor: Actor) -> dict[str, Any]:
    async with _main(request).begin() as connection:
        row = await accounts.revoke_key(connection, key_id)
        if row is None:
            raise NotFound(f"No key '{key_id}'.")
        await accounts.audit(connection, actor, "key.revoked", key_id)
    authenticator = services(request).authenticator
    authenticator.forget(row["fingerprint"])
    return dict(row)


# -- history ------------------------------------------------------------------------------


def _completion(row: RowMapping) -> dict[str, Any]:
    return exports.completion_fields(row)


def _conversation(row: RowMapping) -> dict[str, Any]:
    return {
        **_plain(row),
        "user_id": row["owner"],
        "metadata": stored_json(row["metadata"]),
        "tags": stored_json(row["tags"]),
    }


def _filters(
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    status: int | None,
    errors_only: bool,
    tool: str | None,
    call_type: str | None = None,
    upstream: str | None = None,
) -> CompletionFilter:
    return CompletionFilter(
        model=model,
        since=_utc(since),
        until=_utc(until),
        status=status,
        errors_only=errors_only,
        tool=tool,
        call_type=call_type,
        upstream=upstream,
    )


Model = Annotated[str | None, Query(description="Requested or returned model.")]
Since = Annotated[datetime | None, Query(description="From this time (ISO 8601, UTC if naive).")]
Until = Annotated[datetime | None, Query(description="Before this time.")]
Status = Annotated[int | None, Query(ge=100, le=599, description="HTTP status.")]
ErrorsOnly = Annotated[bool, Query(description="Only completions with status >= 400.")]
Tool = Annotated[str | None, Query(description="Only answers that called this tool.")]
Order = Annotated[Literal["asc", "desc"], Query()]
StatsBy = Literal["user", "model", "day", "call_type", "upstream"]
UpstreamQuery = Annotated[
    str | None, Query(max_length=255, description="Only records this upstream answered.")
]
CallTypeQuery = Annotated[
    m.CallType | None,
    Query(description="Only records of this API; conversations of embeddings only so."),
]


class HistoryQuery:
    """The filters and the page of a user's completions or conversations (query string)."""

    def __init__(
        self,
        model: Model = None,
        since: Since = None,
        until: Until = None,
        status: Status = None,
        errors_only: ErrorsOnly = False,
        tool: Tool = None,
        call_type: CallTypeQuery = None,
        upstream: UpstreamQuery = None,
        limit: Limit = 50,
        after: str | None = None,
        order: Order = "desc",
    ) -> None:
        self.filters = _filters(model, since, until, status, errors_only, tool, call_type, upstream)
        self.limit, self.after, self.descending = limit, after, order == "desc"


Query_ = Annotated[HistoryQuery, Depends()]


@router.get("/completions", response_model=m.ListOf[m.Completion])
async def all_completions(
    request: Request,
    actor: Actor,
    query: Query_,
    user_id: Annotated[str | None, Query(description="Only this user's.")] = None,
) -> dict[str, Any]:
    """Every user's completions (or one ``user_id``'s), newest first, with the filters of a
    user's list."""
    return await list_completions_page(request, _scope_of(user_id), query)


@router.get("/conversations", response_model=m.ListOf[m.Conversation])
async def all_conversations(
    request: Request,
    actor: Actor,
    query: Query_,
    user_id: Annotated[str | None, Query(description="Only this user's.")] = None,
) -> dict[str, Any]:
    """Every user's conversations (or one ``user_id``'s), latest activity first, with the
    filters of a user's list."""
    return await list_conversations_page(request, _scope_of(user_id), query)


@router.get("/users/{user_id}/completions", response_model=m.ListOf[m.Completion])
async def user_completions(
    user_id: str, request: Request, actor: Actor, query: Query_
) -> dict[str, Any]:
    return await list_completions_page(request, Scope.of(user_id), query)


@router.get("/users/{user_id}/conversations", response_model=m.ListOf[m.Conversation])
async def user_conversations(
    user_id: str, request: Request, actor: Actor, query: Query_
) -> dict[str, Any]:
    return await list_conversations_page(request, Scope.of(user_id), query)


async def list_completions_page(
    request: Request, scope: Scope, query: HistoryQuery
) -> dict[str, Any]:
    async with _reader(request).connect() as connection:
        cursor = None
        if query.after:
            cursor = await browse.find_completion(connection, scope, query.after)
            if cursor is None:
                raise NotFound(f"No completion '{query.after}'.", param="after")
        page = await browse.list_completions(
            connection,
            scope,
            query.filters,
            limit=query.limit,
            after=cursor,
            descending=query.descending,
        )
    return _page([_completion(r) for r in page.rows], page.has_more)


async def list_conversations_page(
    request: Request, scope: Scope, query: HistoryQuery
) -> dict[str, Any]:
    async with _reader(request).connect() as connection:
        cursor = None
        if query.after:
            cursor = await browse.find_conversation(connection, scope, query.after)
            if cursor is None:
                raise NotFound(f"No conversation '{query.after}'.", param="after")
        page = await browse.list_conversations(
            connection,
            scope,
            query.filters,
            limit=query.limit,
            after=cursor,
            descending=query.descending,
        )
    return _page([_conversation(r) for r in page.rows], page.has_more)


@router.get("/request-logs", response_model=m.ListOf[m.RequestLog])
async def list_request_logs(
    request: Request,
    actor: Actor,
    path: Annotated[
        str | None, Query(description="The path; ending in *, the paths that begin so.")
    ] = None,
    method: Annotated[str | None, Query(max_length=16)] = None,
    status: Status = None,
    errors_only: ErrorsOnly = False,
    user_id: str | None = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 50,
    after: str | None = None,
    order: Order = "desc",
) -> dict[str, Any]:
    """Every other proxied /v1 request (listing models, stored responses, files, ...):
    method, path, status, latency, bytes, user and client, newest first; everyone's
    unless ``user_id`` is given."""
    scope = _scope_of(user_id)
    filters = browse.LogFilter(
        path=path,
        method=method,
        status=status,
        errors_only=errors_only,
        since=_utc(since),
        until=_utc(until),
    )
    async with _reader(request).connect() as connection:
        cursor = None
        if after:
            cursor = await browse.find_request_log(connection, scope, after)
            if cursor is None:
                raise NotFound(f"No request log '{after}'.", param="after")
        page = await browse.list_request_logs(
            connection, scope, filters, limit=limit, after=cursor, descending=order == "desc"
        )
    return _page(
        [
            {
                **_plain(r),
                "user_id": r["owner"],
                "attempts": attempts_of(
                    stored_json(r["attempts"]), r["upstream"], r["status_code"]
                ),
            }
            for r in page.rows
        ],
        page.has_more,
    )


@router.delete("/users/{user_id}/history", response_model=m.Deleted)
async def delete_user_history(user_id: str, request: Request, actor: Actor) -> Any:
    async with _history(request).begin() as connection:
        deleted = await deletion.delete_owner_history(connection, Scope.of(user_id))
    await _audit(request, actor, "history.user_deleted", user_id, _counts(deleted))
    return deleted


@router.get("/completions/{completion_id}", response_model=m.CompletionDetail)
async def get_completion(completion_id: str, request: Request, actor: Actor) -> dict[str, Any]:
    async with _reader(request).connect() as connection:
        row = await browse.find_completion(connection, Scope.everyone(), completion_id)
        if row is None:
            raise NotFound(f"No completion '{completion_id}'.")
        rebuilder = browse.Rebuilder(connection)
        await rebuilder.load([row["conversation_id"]])
    return {
        **_completion(row),
        "request": rebuilder.request(row),
        "answer": rebuilder.answer(row),
        "extra_choices": stored_json(row["extra_choices"]),
    }


@router.get("/conversations/{conversation_id}", response_model=m.ConversationDetail)
async def get_conversation(conversation_id: str, request: Request, actor: Actor) -> dict[str, Any]:
    return await conversation_detail(request, Scope.everyone(), conversation_id)


async def conversation_detail(
    request: Request, scope: Scope, conversation_id: str
) -> dict[str, Any]:
    async with _reader(request).connect() as connection:
        row = await browse.find_conversation(connection, scope, conversation_id)
        if row is None:
            raise NotFound(f"No conversation '{conversation_id}'.")
        tree = await browse.conversation_messages(connection, conversation_id)
        page = await browse.list_completions(
            connection,
            scope,
            CompletionFilter(conversation_id=conversation_id),
            limit=10_000,
            descending=False,
        )
    by_id = {item["id"]: item for item in tree}
    # Chat: the latest completion's request and answer, which hold all before them. The
    # Responses API: every turn's, in order, each item once (a turn in a conversation the
    # client names sends only what is new, hung under nothing before it).
    turns = page.rows if row["call_type"] == "responses" else page.rows[-1:]
    shown: set[str] = set()
    thread: list[Any] = []
    for turn in turns:
        walked, tail = [], turn["response_hash"] or turn["request_hash"]
        while tail in by_id and tail not in shown:
            walked.append(tail)
            tail = by_id[tail]["parent_id"]
        shown.update(walked)
        thread.extend(by_id[key]["message"] for key in reversed(walked))
    return {
        **_conversation(row),
        "messages": tree,
        "completions": [_completion(r) for r in page.rows],
        "thread": thread,
    }


@router.patch("/conversations/{conversation_id}", response_model=m.Conversation)
async def update_conversation(
    conversation_id: str, body: m.ConversationUpdate, request: Request, actor: Actor
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    sent = body.model_fields_set
    if "title" in sent:
        changes["title"] = body.title
    if "metadata" in sent:
        changes["metadata"] = (
            None if body.metadata is None else orjson.dumps(body.metadata).decode()
        )
    if "tags" in sent:
        changes["tags"] = None if body.tags is None else orjson.dumps(body.tags).decode()
    scope = Scope.everyone()
    async with _history(request).begin() as connection:
        if await browse.find_conversation(connection, scope, conversation_id) is None:
            raise NotFound(f"No conversation '{conversation_id}'.")
        if changes:
            await connection.execute(
                update(conversations).where(conversations.c.id == conversation_id).values(**changes)
            )
        row = await browse.find_conversation(connection, scope, conversation_id)
    await _audit(
        request, actor, "conversation.updated", conversation_id, {"fields": sorted(changes)}
    )
    assert row is not None
    return _conversation(row)


@router.delete("/conversations/{conversation_id}", response_model=m.Deleted)
async def delete_conversation(conversation_id: str, request: Request, actor: Actor) -> Any:
    async with _history(request).begin() as connection:
        if await browse.find_conversation(connection, Scope.everyone(), conversation_id) is None:
            raise NotFound(f"No conversation '{conversation_id}'.")
        deleted = await deletion.delete_conversation(connection, Scope.everyone(), conversation_id)
    await _audit(request, actor, "conversation.deleted", conversation_id, _counts(deleted))
    return deleted


@router.post("/prune", response_model=m.Deleted)
async def prune(body: m.PruneRequest, request: Request, actor: Actor) -> Any:
    """Delete every completion and request log older than ``older_than_days``, and the
    messages and conversations only they used, in small transactions (as retention does),
    so that writers and readers are never held up for long. With ``MES_ARCHIVE_DIR``, what
    goes is archived first; 507 (``archive_unwritable``) when that cannot be done, and what
    was not archived stays."""
    cutoff = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=body.older_than_days)
    maintenance = services(request).maintenance
    try:
        run = await maintenance.archived(
            retention.prune(
                _history(request),
                cutoff,
                partitions=maintenance.partitions,
                archive=maintenance.archive,
                reason="prune",
            )
        )
    except ArchiveFailed as error:
        raise ArchiveUnwritable(str(error)) from None
    details = {"older_than_days": body.older_than_days, **_counts(run.deleted)}
    await _audit(request, actor, "history.pruned", None, details)
    return run.deleted


# -- search, statistics, export -----------------------------------------------------------


def _cursor(position: search.Position) -> str:
    raw = orjson.dumps(
        [position.created_at.isoformat(), position.conversation_id, position.message_id]
    )
    return base64.urlsafe_b64encode(raw).decode()


def _position(cursor: str) -> search.Position:
    try:
        moment, conversation_id, message_id = orjson.loads(base64.urlsafe_b64decode(cursor))
        return search.Position(
            datetime.fromisoformat(moment), str(conversation_id), str(message_id)
        )
    except (ValueError, TypeError) as error:
        raise InvalidRequest("Malformed cursor.", param="cursor", code="invalid_cursor") from error


@router.get("/search", response_model=m.SearchResults)
async def search_messages(
    request: Request,
    actor: Actor,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="Phrase to find.")],
    user_id: str | None = None,
    limit: Limit = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Messages whose text contains ``q`` (any script, case ignored where it has case),
    newest first; a user's only when ``user_id`` is given."""
    scope = _scope_of(user_id)
    return await search_page(request, scope, q, limit, cursor)


async def search_page(
    request: Request, scope: Scope, q: str, limit: int, cursor: str | None
) -> dict[str, Any]:
    after = _position(cursor) if cursor else None
    async with _reader(request).connect() as connection:
        hits, has_more = await search.search(connection, scope, q, limit=limit, after=after)
    next_cursor = None
    if has_more and hits:
        last = hits[-1]
        next_cursor = _cursor(
            search.Position(last.created_at, last.conversation_id, last.message_id)
        )
    return {
        "object": "list",
        "data": [search.as_dict(hit) for hit in hits],
        "next_cursor": next_cursor,
        "has_more": has_more,
    }


@router.get("/stats", response_model=m.Stats)
async def usage_stats(
    request: Request,
    actor: Actor,
    by: StatsBy = "day",
    user_id: str | None = None,
    since: Since = None,
    until: Until = None,
) -> dict[str, Any]:
    """Requests, errors, tokens and latency percentiles per user, model, day (UTC), call
    type (chat, responses, embeddings, completions) or upstream (the one that answered)."""
    scope = _scope_of(user_id)
    return await usage_of(request, scope, by, since, until)


async def usage_of(
    request: Request, scope: Scope, by: StatsBy, since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    async with _reader(request).connect() as connection:
        rows = await stats.usage_stats(connection, scope, by, _utc(since), _utc(until))
    return {"by": by, "since": since, "until": until, "data": rows}


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "A JSON array of completions, or JSON lines",
            "content": {"application/json": {}, "application/x-ndjson": {}},
        }
    },
)
async def export(
    request: Request,
    actor: Actor,
    format: Literal["json", "jsonl", "fine-tuning"] = "jsonl",
    user_id: str | None = None,
    model: Model = None,
    since: Since = None,
    until: Until = None,
    call_type: CallTypeQuery = None,
    upstream: UpstreamQuery = None,
    status: Status = None,
    errors_only: ErrorsOnly = False,
    tool: Tool = None,
    conversation_id: Annotated[str | None, Query(description="Only this conversation.")] = None,
) -> StreamingResponse:
    """Completions with their requests and answers, oldest first, streamed: ``json`` (an
    array of records), ``jsonl`` (a record a line), or ``fine-tuning`` (OpenAI's chat
    fine-tuning format, a line per answered completion). Every filter of the lists, and
    ``conversation_id`` for one conversation."""
    scope = _scope_of(user_id)
    filters = dataclasses.replace(
        _filters(model, since, until, status, errors_only, tool, call_type, upstream),
        conversation_id=conversation_id,
    )
    return await export_response(request, actor, scope, format, filters)


async def export_response(
    request: Request,
    actor: str,
    scope: Scope,
    format: str,
    filters: CompletionFilter | None = None,
) -> StreamingResponse:
    """The export of ``scope``'s completions matching ``filters``, audited (the admin API's
    and the viewer's export button)."""
    filters = dataclasses.replace(
        filters or CompletionFilter(), answered_only=format == "fine-tuning"
    )
    target = None if scope.all_owners else scope.owner
    await _audit(request, actor, "history.exported", target, {"format": format})
    lines = _export_lines(_reader(request), scope, filters, format)
    media = "application/json" if format == "json" else "application/x-ndjson"
    name = f"mes-history.{'json' if format == 'json' else 'jsonl'}"
    return StreamingResponse(
        lines, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


async def _export_lines(
    engine: AsyncEngine, scope: Scope, filters: CompletionFilter, format: str
) -> AsyncIterator[bytes]:
    first = True
    if format == "json":
        yield b"["
    context = format == "fine-tuning"  # a follow-up's example needs what came before it
    async for row, request, answer, conversation in browse.iter_completions(
        engine, scope, filters, context=context
    ):
        if format == "fine-tuning":
            example = fine_tuning_example(row, request, answer)
            if example is not None:
                yield orjson.dumps(example) + b"\n"
            continue
        line = exports.line(exports.export_record(row, request, answer, conversation))
        if format == "json":
            yield (b"" if first else b",") + b"\n" + line[:-1]
        else:
            yield line
        first = False
    if format == "json":
        yield b"\n]\n"


@router.get("/dead-letters", response_model=m.ListOf[m.DeadLetter])
async def dead_letters(
    request: Request,
    actor: Actor,
    limit: Limit = 100,
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> dict[str, Any]:
    """Records a history database refused for good (with the reason), oldest first; they
    are kept in ``MES_SPOOL_DIR/dead-letter.jsonl`` and nothing else is done with them."""
    path = Path(services(request).settings.spool_dir) / "dead-letter.jsonl"
    items = await asyncio.to_thread(_read_dead_letters, path, after or 0, limit + 1)
    return _page(items[:limit], len(items) > limit)


def _read_dead_letters(path: Path, skip: int, count: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if not path.exists():
        return items
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if number <= skip:
                continue
            if len(items) >= count:
                break
            record = stored_json(line.decode(errors="replace"))
            reason = record.pop("dead_letter_reason", None) if isinstance(record, dict) else None
            items.append({"id": str(number), "reason": reason, "record": record})
    return items


@router.get("/audit", response_model=m.ListOf[m.AuditEntry])
async def audit_log(
    request: Request,
    actor: Actor,
    limit: Limit = 100,
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> dict[str, Any]:
    """Admin actions and history changes, newest first; page with ``after=<last id>``."""
    async with _main(request).connect() as connection:
        rows = await accounts.list_audit(connection, limit + 1, after)
    items = [{**r, "details": stored_json(r["details"])} for r in rows[:limit]]
    return _page(items, len(rows) > limit)


def _counts(deleted: deletion.Deleted) -> dict[str, Any]:
    return dataclasses.asdict(deleted)


async def _audit(
    request: Request, actor: str, action: str, target: str | None, details: dict[str, Any]
) -> None:
    async with _main(request).begin() as connection:
        await accounts.audit(connection, actor, action, target, details)


def create_admin_app() -> FastAPI:
    return json_api("MES Gateway admin API", router)


def json_api(title: str, routes: APIRouter) -> FastAPI:
    """A JSON API of ``routes``: its OpenAPI schema at ``/openapi.json``, its errors in the
    gateway's shape."""
    app = FastAPI(
        title=title, version="1", openapi_url="/openapi.json", docs_url=None, redoc_url=None
    )
    app.include_router(routes)
    app.add_exception_handler(GatewayError, json_error)
    app.add_exception_handler(StarletteHTTPException, json_error)
    for trouble in DATABASE_TROUBLE:
        app.add_exception_handler(trouble, database_error)
    return app
