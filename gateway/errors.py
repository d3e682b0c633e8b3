"""The gateway's own errors, and how each is answered: in OpenAI's error shape on ``/v1`` and
on ``/admin`` (``json_error``, and ``asgi.send_error`` for the pure-ASGI proxy, both from
``GatewayError.body``), as a page on ``/ui`` (``gateway/ui.py``). Endpoints raise them;
each surface's exception handler answers them.

Upstream errors are never turned into these: an upstream 4xx/5xx reaches the client as the
upstream sent it. These are for what goes wrong before or instead of an upstream answer:

    GatewayError
    ├── InvalidRequest       400  the body is not a JSON object, or a field has a wrong type
    ├── PayloadTooLarge      413  the body is over GATEWAY_MAX_BODY_BYTES; nothing went upstream
    ├── InvalidGatewayKey    401  managed mode, and the key is missing or not a gateway key
    ├── Forbidden            403  an admin route without GATEWAY_ADMIN_KEY
    ├── NotFound             404  a route the gateway does not serve, or history not the caller's
    │   └── ModelNotFound    404  no upstream's UPSTREAM_<NAME>_MODELS matches the model
    ├── MethodNotAllowed     405  a route the gateway serves, with another method
    ├── KeyStoreUnavailable  503  managed mode, an unknown key, and the main database is down
    ├── HistoryUnavailable   503  a read of history, and its database (or replica) is down
    ├── UpstreamUnreachable  502  the upstream refused or dropped the connection
    └── UpstreamTimeout      504  the upstream did not answer within UPSTREAM_TIMEOUT

On Anthropic's route (``/v1/messages``) the same errors take Anthropic's shape
(``anthropic_body``), so that its SDKs raise the error they would raise there.
"""

from __future__ import annotations

import orjson
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from storage.writer import is_unavailable


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    def anthropic_body(self) -> bytes:
        """The error as Anthropic's API words it: its type says what the status says."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class InvalidGatewayKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Forbidden(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class KeyStoreUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "key_store_unavailable"


class HistoryUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "history_unavailable"


class ArchiveUnwritable(GatewayError):
    """A prune stopped because what it would remove could not be archived first."""

    status = 507
    type = "server_error"
    code = "archive_unwritable"


class UpstreamUnreachable(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


def gateway_error(request: Request, error: Exception) -> GatewayError:
    """``error`` as one of the gateway's own: what Starlette itself refuses (a path no route
    matches, a method a route does not take) becomes the error the gateway would raise."""
    if isinstance(error, GatewayError):
        return error
    assert isinstance(error, HTTPException)
    message = f"{error.detail}: {request.method} {request.url.path}"
    if error.status_code == 405:
        return MethodNotAllowed(message)
    if error.status_code == 404:
        return NotFound(message)
    refused = GatewayError(message)
    refused.status = error.status_code
    if error.status_code < 500:
        refused.type = "invalid_request_error"
    return refused


# What a database that is down or unreachable raises (``history_unavailable`` looks closer).
DATABASE_TROUBLE: tuple[type[Exception], ...] = (DBAPIError, OSError)


def history_unavailable(error: Exception) -> HistoryUnavailable | None:
    """``error`` as the gateway's own when it says that the database a read of history went
    to (a read replica, say) is down or unreachable: 503, not a server error."""
    if is_unavailable(error):
        return HistoryUnavailable("The history database cannot be reached; try again later.")
    return None


async def database_error(request: Request, error: Exception) -> Response:
    """The exception handler of the JSON APIs (``/admin``, ``/me``) for a database's errors."""
    found = history_unavailable(error)
    if found is None:
        raise error
    return await json_error(request, found)


async def json_error(request: Request, error: Exception) -> Response:
    """The exception handler of the JSON surfaces (``/v1``, ``/admin``)."""
    found = gateway_error(request, error)
    headers = error.headers if isinstance(error, HTTPException) else None  # Allow, for 405
    return Response(
        found.body(), status_code=found.status, media_type="application/json", headers=headers
    )
