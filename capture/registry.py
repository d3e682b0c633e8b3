"""The captured APIs, by the method and path they answer, and every record kind the spool
may hold. Capturing one more API is a module like ``capture/chat.py`` and a line here."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from capture import chat, completions, embeddings, messages, responses
from capture.api import Api
from capture.exchange import Exchange, RequestLog
from capture.shaped import Shaped

ROUTES: Mapping[tuple[str, str], Api] = MappingProxyType(
    {
        ("POST", "/v1/chat/completions"): chat.API,
        ("POST", "/v1/responses"): responses.API,
        ("POST", "/v1/embeddings"): embeddings.API,
        ("POST", "/v1/completions"): completions.API,
        ("POST", "/v1/messages"): messages.API,
    }
)

# A record spooled as its rows (by a gateway that redacts) is one more kind.
RECORD_KINDS: Mapping[str, type[Exchange] | type[RequestLog] | type[Shaped]] = MappingProxyType(
    {
        RequestLog.kind: RequestLog,
        Shaped.kind: Shaped,
        **{api.kind: api.record for api in ROUTES.values()},
    }
)


def captured(method: str, path: str) -> Api | None:
    """The API whose calls ``method path`` makes, or None for a request only logged."""
    return ROUTES.get((method, path))
