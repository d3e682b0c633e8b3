"""OpenAI's stored-completions API, served from the history database, scoped to the caller.

    GET    /v1/chat/completions                   list (limit, after, order, model, metadata[k])
    GET    /v1/chat/completions/{id}              retrieve
    GET    /v1/chat/completions/{id}/messages     the request's messages, ids "<id>-<index>"
    POST   /v1/chat/completions/{id}              update metadata
    DELETE /v1/chat/completions/{id}              delete

The caller is identified exactly as for the proxy (``gateway/auth.py``) and sees only its
own completions: another caller's id answers 404, as if it did not exist. A caller with no
key has no history to read. Ids are the upstream's ``chatcmpl-...`` ids, as the client got
them; the gateway's own record id (``mes.record_id``) is accepted too. Errors are raised as
the gateway's own (``gateway/errors.py``), and answered by the app's handler.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import Authenticator
from gateway.completion_objects import completion_object, message_objects
from gateway.errors import InvalidGatewayKey, InvalidRequest, NotFound
from storage import accounts, browse, deletion, history
from storage.browse import CompletionFilter, Rebuilder
from storage.schema import completions
from storage.scope import Scope

MAX_LIMIT = 100
MAX_METADATA_PAIRS = 16


class StoredCompletions:
    def __init__(
        self,
        history_engine: AsyncEngine,
        reader: AsyncEngine,
        main_engine: AsyncEngine,
        authenticator: Authenticator,
    ) -> None:
        self.history = history_engine  # updates and deletions
        self.reader = reader  # reads: a replica, if there is one
        self.main = main_engine
        self.authenticator = authenticator

    async def list(self, request: Request) -> Response:
        scope = await self._scope(request)
        limit = _limit(request)
        order = _order(request)
        filters = CompletionFilter(
            model=request.query_params.get("model") or None,
            metadata=_metadata_filter(request),
            answered_only=True,
            call_type=CHAT,  # as OpenAI's: chat completions alone
        )
        async with self.reader.connect() as connection:
            after = await self._after(connection, scope, request.query_params.get("after"))
            page = await browse.list_completions(
                connection, scope, filters, limit=limit, after=after, descending=order == "desc"
            )
            rebuilder = Rebuilder(connection)
            await rebuilder.load(row["conversation_id"] for row in page.rows)
            data = [completion_object(row, rebuilder.answer(row)) for row in page.rows]
        return _list(data, page.has_more)

    async def retrieve(self, request: Request) -> Response:
        scope = await self._scope(request)
        async with self.reader.connect() as connection:
            row = await _found(connection, scope, request.path_params["completion_id"])
            answer = await history.answer_message(connection, row)
        return _json(completion_object(row, answer))

    async def messages(self, request: Request) -> Response:
        scope = await self._scope(request)
        limit = _limit(request)
        order = _order(request)
        async with self.reader.connect() as connection:
            row = await _found(connection, scope, request.path_params["completion_id"])
            sent = await history.request_messages(connection, row)
        items = message_objects(browse.public_id(row), sent)
        if order == "desc":
            items.reverse()
        after = request.query_params.get("after")
        if after:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise NotFound(f"No message found with id '{after}'.", param="after")
            items = items[ids.index(after) + 1 :]
        return _list(items[:limit], len(items) > limit)

    async def update(self, request: Request) -> Response:
        scope = await self._scope(request)
        new_metadata = _metadata_body(await request.body())
        async with self.history.begin() as connection:
            row = await _found(connection, scope, request.path_params["completion_id"])
            await connection.execute(
                update(completions)
                .where(scope.where(completions), completions.c.id == row["id"])
                .values(metadata=None if new_metadata is None else _dumps(new_metadata))
            )
            row = await _found(connection, scope, row["id"])
            answer = await history.answer_message(connection, row)
        await self._audit(scope, "completion.metadata_updated", row["id"])
        return _json(completion_object(row, answer))

    async def delete(self, request: Request) -> Response:
        scope = await self._scope(request)
        async with self.history.begin() as connection:
            row = await _found(connection, scope, request.path_params["completion_id"])
            await deletion.delete_completion(connection, scope, row["id"])
        await self._audit(scope, "completion.deleted", row["id"])
        return _json(
            {"object": "chat.completion.deleted", "id": browse.public_id(row), "deleted": True}
        )

    async def _scope(self, request: Request) -> Scope:
        if has_nul(request):
            raise InvalidRequest("NUL characters are not allowed in paths or queries.")
        caller = await self.authenticator.identify(
            request.headers.get("authorization"), request.headers.get("api-key")
        )
        if caller.key_fingerprint is None:
            raise InvalidGatewayKey(
                "Reading history needs a key: send it as 'Authorization: Bearer <key>'."
            )
        return Scope.of(caller.owner)

    async def _after(
        self, connection: AsyncConnection, scope: Scope, after: str | None
    ) -> RowMapping | None:
        if not after:
            return None
        row = await browse.find_completion(connection, scope, after, CHAT)
        if row is None:
            raise NotFound(f"No chat completion found with id '{after}'.", param="after")
        return row

    async def _audit(self, scope: Scope, action: str, target: str) -> None:
        async with self.main.begin() as connection:
            await accounts.audit(connection, scope.owner, action, target)


CHAT = "chat"


def has_nul(request: Request) -> bool:
    """NUL in a path or query can match nothing stored, and PostgreSQL refuses to be asked."""
    params = request.query_params.multi_items()
    return "\x00" in request.url.path or any("\x00" in k + v for k, v in params)


async def _found(connection: AsyncConnection, scope: Scope, completion_id: str) -> RowMapping:
    row = await browse.find_completion(connection, scope, completion_id, CHAT)
    if row is None:
        raise NotFound(f"No chat completion found with id '{completion_id}'.")
    return row


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return 20
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    return int(raw)


def _order(request: Request) -> str:
    order = request.query_params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")
    return order


def _metadata_filter(request: Request) -> dict[str, str]:
    pairs = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            pairs[key[len("metadata[") : -1]] = value
    return pairs


def _metadata_body(body: bytes) -> dict[str, str] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest("The body is not valid JSON.") from error
    if not isinstance(parsed, dict) or "metadata" not in parsed:
        raise InvalidRequest("The body must be an object with a 'metadata' field.")
    value = parsed["metadata"]
    if value is None:
        return None
    valid = (
        isinstance(value, dict)
        and len(value) <= MAX_METADATA_PAIRS
        and all(isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items())
    )
    if not valid:
        raise InvalidRequest(
            "metadata must map at most 16 keys (up to 64 characters) to strings "
            "(up to 512 characters).",
            param="metadata",
        )
    return dict(value)


def _list(data: list[Any], has_more: bool) -> Response:
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else "",
            "last_id": data[-1]["id"] if data else "",
            "has_more": has_more,
        }
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
