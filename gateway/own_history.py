"""Every user's own history under ``/me``, with their own key, in the admin API's shapes:

    GET /me/completions                 their completions, with the admin lists' filters
    GET /me/conversations               their conversations
    GET /me/conversations/{id}          one, with its messages, completions and thread
    GET /me/search?q=...                their messages that contain a phrase
    GET /me/stats?by=model|day|...      their requests, tokens, cost and latency

The caller is identified as for the proxy and the stored-completions API
(``gateway/auth.py``), and sees only its own: another caller's ids answer 404, as if they
did not exist. OpenAI's own API reads stored chat completions (``/v1/chat/completions``);
these read the rest of what the gateway keeps, of every kind of call.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request

from gateway import admin
from gateway import admin_models as m
from gateway.errors import InvalidGatewayKey, InvalidRequest
from gateway.services import services
from gateway.stored_completions import has_nul
from storage.scope import Scope


async def caller_scope(request: Request) -> Scope:
    if has_nul(request):
        raise InvalidRequest("NUL characters are not allowed in paths or queries.")
    caller = await services(request).authenticator.identify(
        request.headers.get("authorization"), request.headers.get("api-key")
    )
    if caller.key_fingerprint is None:
        raise InvalidGatewayKey(
            "Reading history needs a key: send it as 'Authorization: Bearer <key>'."
        )
    return Scope.of(caller.owner)


Own = Annotated[Scope, Depends(caller_scope)]
router = APIRouter(responses=admin.ERRORS)


@router.get("/completions", response_model=m.ListOf[m.Completion])
async def own_completions(request: Request, scope: Own, query: admin.Query_) -> dict[str, Any]:
    return await admin.list_completions_page(request, scope, query)


@router.get("/conversations", response_model=m.ListOf[m.Conversation])
async def own_conversations(request: Request, scope: Own, query: admin.Query_) -> dict[str, Any]:
    return await admin.list_conversations_page(request, scope, query)


@router.get("/conversations/{conversation_id}", response_model=m.ConversationDetail)
async def own_conversation(conversation_id: str, request: Request, scope: Own) -> dict[str, Any]:
    return await admin.conversation_detail(request, scope, conversation_id)


@router.get("/search", response_model=m.SearchResults)
async def own_search(
    request: Request,
    scope: Own,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="Phrase to find.")],
    limit: admin.Limit = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    return await admin.search_page(request, scope, q, limit, cursor)


@router.get("/stats", response_model=m.Stats)
async def own_stats(
    request: Request,
    scope: Own,
    by: admin.StatsBy = "day",
    since: admin.Since = None,
    until: admin.Until = None,
) -> dict[str, Any]:
    return await admin.usage_of(request, scope, by, since, until)


def create_own_app() -> FastAPI:
    return admin.json_api("MES Gateway: your own history", router)
