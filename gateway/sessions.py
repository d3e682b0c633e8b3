"""Who signed in to the viewer: a signed, expiring session cookie and what it says.

Apart from the viewer itself (``gateway/ui.py``) so that the lifespan makes a process's
sessions without loading the viewer, which is loaded on its first request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass

import orjson

from gateway.settings import Settings
from storage.scope import Scope

COOKIE = "mes_ui"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking: an admin (every owner) or one owner."""

    admin: bool
    owner: str
    fingerprint: str | None

    @property
    def scope(self) -> Scope:
        return Scope.everyone() if self.admin else Scope.of(self.owner)

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.owner


class Sessions:
    """Signed, expiring session cookies. The secret is ``MES_UI_SECRET``, else made from the
    admin key (so every replica with the same settings accepts the same cookie), else
    random per process (sessions then end when the process does)."""

    def __init__(self, settings: Settings) -> None:
        if settings.ui_secret:
            seed = settings.ui_secret.encode()
        elif settings.gateway_admin_key:
            seed = b"mes-ui\n" + settings.gateway_admin_key.encode()
        else:
            seed = os.urandom(32)
        self.secret = hashlib.sha256(seed).digest()

    def issue(self, viewer: Viewer) -> str:
        body = orjson.dumps(
            {
                "a": viewer.admin,
                "o": viewer.owner,
                "f": viewer.fingerprint,
                "e": int(time.time()) + SESSION_SECONDS,
            }
        )
        payload = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}"

    def read(self, cookie: str | None) -> Viewer | None:
        if not cookie or "." not in cookie:
            return None
        payload, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            body = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            return None
        if body.get("e", 0) < time.time():
            return None
        return Viewer(bool(body["a"]), str(body["o"]), body.get("f"))

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self.secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
