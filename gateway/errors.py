"""The gateway's own errors, each answered once, in OpenAI's error shape.

Upstream errors are never turned into these: an upstream 4xx/5xx reaches the client as the
upstream sent it. These are for what goes wrong before or instead of an upstream answer:

    GatewayError
    ├── InvalidRequest       400  the body is not a JSON object, or a field has a wrong type
    ├── PayloadTooLarge      413  the body is over GATEWAY_MAX_BODY_BYTES; nothing went upstream
    ├── InvalidGatewayKey    401  managed mode, and the key is missing or not a gateway key
    ├── Forbidden            403  an admin route without GATEWAY_ADMIN_KEY
    ├── NotFound             404  a route the gateway does not serve, or history not the caller's
    ├── KeyStoreUnavailable  503  managed mode, an unknown key, and the main database is down
    ├── UpstreamUnreachable  502  the upstream refused or dropped the connection
    └── UpstreamTimeout      504  the upstream did not answer within UPSTREAM_TIMEOUT
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

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


class Forbidden(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class KeyStoreUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "key_store_unavailable"


class UpstreamUnreachable(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
