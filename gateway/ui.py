"""The history viewer: server-rendered pages under ``/ui`` on top of the same queries as the
admin API.

Signing in takes the admin key (every user's history) or a gateway key (the history that
key's user reads through OpenAI's API, and nothing else: another user's pages answer 404,
as the API does). The session is a cookie holding who signed in and until when, signed
with HMAC: never the key itself. Each page checks a user's key again, so a revoked key or
a disabled user loses the viewer at once. Templates escape everything they print
(Jinja2's autoescape); the only markup made from stored text is a search hit's <mark>,
built from escaped parts.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from markupsafe import Markup, escape
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from gateway.admin import export_response
from gateway.errors import GatewayError, NotFound, gateway_error
from gateway.services import services
from gateway.sessions import COOKIE, SESSION_SECONDS, Viewer
from storage import browse, search, stats, usage
from storage.browse import CompletionFilter
from storage.scope import Scope

PAGE = 50

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


async def _viewer(request: Request) -> Viewer | None:
    viewer = services(request).ui_sessions.read(request.cookies.get(COOKIE))
    if viewer is None or viewer.admin or viewer.fingerprint is None:
        return viewer
    try:  # the key may have been revoked, or its user disabled, since
        caller = await services(request).authenticator.caller_of(viewer.fingerprint)
    except GatewayError:
        return None
    return viewer if caller.owner == viewer.owner else None


def _page(
    request: Request, name: str, viewer: Viewer | None, status_code: int = 200, **context: Any
) -> Response:
    return templates.TemplateResponse(
        request,
        name,
        {"viewer": viewer, **context},
        status_code=status_code,
        headers=_SECURITY_HEADERS,
    )


# Nothing on these pages comes from elsewhere, and nothing stored may run as a script.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _signed_in(handler: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        viewer = await _viewer(request)
        if viewer is None:
            target = urlencode({"next": request.url.path})
            return RedirectResponse(f"/ui/login?{target}", status_code=303)
        return await handler(request, viewer)  # type: ignore[no-any-return]

    return endpoint


async def login_form(request: Request) -> Response:
    return _page(request, "login.html", None, error=None, next=_next(request))


async def login(request: Request) -> Response:
    # The sign-in form's urlencoded body, read without a multipart parser (none is needed).
    form = parse_qs((await request.body())[:8192].decode("utf-8", "replace"))
    key = (form.get("key") or [""])[0].strip()
    target = _next(request, (form.get("next") or [""])[0])
    settings = services(request).settings
    viewer: Viewer | None = None
    if settings.gateway_admin_key and hmac.compare_digest(
        key.encode(), settings.gateway_admin_key.encode()
    ):
        viewer = Viewer(True, "", None)
    elif key:
        try:
            caller = await services(request).authenticator.identify(f"Bearer {key}", None)
            viewer = Viewer(False, caller.owner, caller.key_fingerprint)
        except GatewayError:
            viewer = None
    if viewer is None:
        error = "That key was not accepted."
        return _page(request, "login.html", None, 401, error=error, next=target)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        services(request).ui_sessions.issue(viewer),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/ui",
    )
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


def _next(request: Request, given: str = "") -> str:
    target = given or request.query_params.get("next", "")
    # Only a page of this viewer: never another site (an open redirect).
    return target if target.startswith("/ui") and "//" not in target else "/ui"


async def home(request: Request, viewer: Viewer) -> Response:
    if not viewer.admin:
        return RedirectResponse(f"/ui/users/{viewer.owner}", status_code=303)
    async with _reader(request).connect() as connection:
        # Latency belongs to models, not users: it is on the statistics page.
        owners = await usage.daily_usage(connection, Scope.everyone(), "user", percentiles=False)
    owners.sort(key=lambda row: -row["requests"])
    return _page(request, "users.html", viewer, owners=owners)


async def user_conversations(request: Request, viewer: Viewer) -> Response:
    owner = request.path_params["owner"]
    if not viewer.may_see(owner):
        raise NotFound("There is nothing here, or nothing you may see.")
    scope = Scope.of(owner)
    after_id = request.query_params.get("after")
    async with _reader(request).connect() as connection:
        after = None
        if after_id:
            after = await browse.find_conversation(connection, scope, after_id)
            if after is None:
                raise NotFound("There is nothing here, or nothing you may see.")
        page = await browse.list_conversations(
            connection, scope, CompletionFilter(), limit=PAGE, after=after
        )
    return _page(
        request,
        "conversations.html",
        viewer,
        owner=owner,
        conversations=page.rows,
        has_more=page.has_more,
        next_after=page.rows[-1]["id"] if page.rows and page.has_more else None,
    )


async def conversation(request: Request, viewer: Viewer) -> Response:
    conversation_id = request.path_params["conversation_id"]
    async with _reader(request).connect() as connection:
        row = await browse.find_conversation(connection, viewer.scope, conversation_id)
        if row is None:
            raise NotFound("There is nothing here, or nothing you may see.")
        tree = await browse.conversation_messages(connection, conversation_id)
        page = await browse.list_completions(
            connection,
            viewer.scope,
            CompletionFilter(conversation_id=conversation_id),
            limit=2_000,
            descending=False,
        )
    return _page(request, "conversation.html", viewer, **thread_view(row, tree, page.rows))


def thread_view(row: Any, tree: list[dict[str, Any]], completions: list[Any]) -> dict[str, Any]:
    """A conversation as threads: the branch each completion ends, longest first, each
    message once, with the completions that answered at each point."""
    by_id = {item["id"]: item for item in tree}
    answered_at: dict[str, list[Any]] = {}
    for completion in completions:
        if completion["response_hash"]:
            answered_at.setdefault(completion["response_hash"], []).append(completion)
    parents = {item["parent_id"] for item in tree}
    tails = [item["id"] for item in tree if item["id"] not in parents]
    branches = []
    for tail in tails:
        chain = []
        at: str | None = tail
        while at in by_id:
            chain.append(by_id[at])
            at = by_id[at]["parent_id"]
        chain.reverse()
        branches.append(chain)
    branches.sort(key=len, reverse=True)
    shown: set[str] = set()
    threads = []
    for chain in branches:
        start = next((n for n, item in enumerate(chain) if item["id"] not in shown), len(chain))
        threads.append({"fork_after": start, "messages": chain[start:]})
        shown.update(item["id"] for item in chain)
    return {
        "conversation": row,
        "threads": threads,
        "answered_at": answered_at,
        "completions": completions,
    }


async def search_page(request: Request, viewer: Viewer) -> Response:
    phrase = request.query_params.get("q", "").strip()[:1000]
    hits: list[search.Hit] = []
    has_more = False
    if phrase:
        async with _reader(request).connect() as connection:
            hits, has_more = await search.search(connection, viewer.scope, phrase, limit=PAGE)
    return _page(
        request,
        "search.html",
        viewer,
        phrase=phrase,
        hits=[(hit, highlight(hit.snippet, phrase)) for hit in hits],
        has_more=has_more,
    )


def highlight(text: str, phrase: str) -> Markup:
    """``text`` escaped, with every match of ``phrase`` (case ignored) in <mark>."""
    folded, needle = text.casefold(), phrase.casefold()
    if not needle or len(folded) != len(text):  # casefold changed lengths: no positions
        return escape(text)
    parts: list[str] = []
    at = 0
    while (found := folded.find(needle, at)) >= 0:
        parts.append(str(escape(text[at:found])))
        parts.append(f"<mark>{escape(text[found : found + len(needle)])}</mark>")
        at = found + len(needle)
    parts.append(str(escape(text[at:])))
    return Markup("".join(parts))


async def errors_page(request: Request, viewer: Viewer) -> Response:
    after_id = request.query_params.get("after")
    async with _reader(request).connect() as connection:
        after = None
        if after_id:
            after = await browse.find_completion(connection, viewer.scope, after_id)
            if after is None:
                raise NotFound("There is nothing here, or nothing you may see.")
        page = await browse.list_completions(
            connection, viewer.scope, CompletionFilter(errors_only=True), limit=PAGE, after=after
        )
        # The other routes' errors: the latest, beside the captured calls' (a page of each).
        logged = await browse.list_request_logs(
            connection, viewer.scope, browse.LogFilter(errors_only=True), limit=PAGE
        )
    return _page(
        request,
        "errors.html",
        viewer,
        completions=page.rows,
        next_after=page.rows[-1]["id"] if page.rows and page.has_more else None,
        logged=logged.rows,
    )


async def stats_page(request: Request, viewer: Viewer) -> Response:
    try:
        days = max(1, min(366, int(request.query_params.get("days", "30"))))
    except ValueError:
        days = 30
    since = datetime.now(UTC).date() - timedelta(days=days - 1)  # today is the last of them
    async with _reader(request).connect() as connection:
        by_day = await usage.daily_usage(connection, viewer.scope, "day", since, percentiles=False)
        by_model = await usage.daily_usage(connection, viewer.scope, "model", since)
        routes = await stats.route_stats(
            connection, viewer.scope, datetime.combine(since, datetime.min.time())
        )
    return _page(
        request,
        "stats.html",
        viewer,
        days=days,
        by_day=by_day,
        by_model=by_model,
        charts=[
            ("Requests per day", bars(by_day, "requests")),
            ("Tokens per day", bars(by_day, "total_tokens")),
            ("Errors per day", bars(by_day, "errors")),
        ],
        model_chart=bars(by_model, "requests"),
        routes=routes,
    )


def bars(rows: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """Rows as bars of a chart drawn in CSS: each one's share of the tallest, in percent."""
    top = max((row[field] for row in rows), default=0) or 1
    return [
        {"label": row["key"] or "(none)", "value": row[field], "percent": 100 * row[field] / top}
        for row in rows
    ]


async def export(request: Request, viewer: Viewer) -> Response:
    owner = request.query_params.get("user_id") or None
    if owner is not None and not viewer.may_see(owner):
        raise NotFound("There is nothing here, or nothing you may see.")
    scope = Scope.of(owner) if owner else viewer.scope
    format = request.query_params.get("format", "jsonl")
    if format not in ("json", "jsonl", "fine-tuning"):
        format = "jsonl"
    actor = "admin (viewer)" if viewer.admin else f"user {viewer.owner} (viewer)"
    return await export_response(request, actor, scope, format)


def _reader(request: Request) -> AsyncEngine:
    """Where the viewer reads history: a replica, if there is one (``MES_SQL_READ_DSN``)."""
    return services(request).history_reader


async def error_page(request: Request, error: Exception) -> Response:
    """The viewer's errors as a page: not found (or not the viewer's to see) as one page."""
    found = gateway_error(request, error)
    if found.status != 404:
        return PlainTextResponse(found.message, status_code=found.status)
    return _page(request, "not_found.html", await _viewer(request), status_code=404)


def create_ui() -> Starlette:
    return Starlette(
        exception_handlers={GatewayError: error_page, HTTPException: error_page},
        routes=[
            Route("/login", login_form, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/", _signed_in(home)),
            Route("/users/{owner}", _signed_in(user_conversations)),
            Route("/conversations/{conversation_id}", _signed_in(conversation)),
            Route("/search", _signed_in(search_page)),
            Route("/errors", _signed_in(errors_page)),
            Route("/stats", _signed_in(stats_page)),
            Route("/export", _signed_in(export)),
        ],
    )
