"""Who is calling: the key a request presents, checked in managed mode, always fingerprinted.

Keys themselves are never kept: the gateway compares and stores SHA-256 fingerprints only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gateway.errors import InvalidGatewayKey

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    """``owner`` scopes history: the key's fingerprint (users and their keys come later)."""

    owner: str
    key_fingerprint: str | None


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key in ``Authorization: Bearer ...`` or, as Azure clients send it, ``api-key``."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    return None


class Authenticator:
    def __init__(self, gateway_keys: frozenset[str], managed: bool) -> None:
        self._managed = managed
        self._fingerprints = frozenset(fingerprint(key) for key in gateway_keys)

    @property
    def fingerprints(self) -> frozenset[str]:
        return self._fingerprints

    def identify(self, authorization: str | None, api_key: str | None) -> Caller:
        key = presented_key(authorization, api_key)
        if key is None:
            if self._managed:
                raise InvalidGatewayKey(
                    "Missing gateway key: send it as 'Authorization: Bearer <key>'."
                )
            return Caller(ANONYMOUS, None)
        digest = fingerprint(key)
        if self._managed and digest not in self._fingerprints:
            raise InvalidGatewayKey("Incorrect gateway key provided.")
        return Caller(digest, digest)
