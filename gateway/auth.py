"""Who is calling: the key a request presents, checked in managed mode, always fingerprinted.

Keys themselves are never kept: the gateway compares and stores SHA-256 fingerprints only.

Pass-through mode: the caller is the fingerprint of whatever key it presents (that key goes
upstream). Managed mode: the key must be a gateway key, either one of ``GATEWAY_KEYS``
(the caller is its fingerprint) or one issued through the admin API (the caller is its
user). Issued keys are looked up in the main database and remembered for ``ttl`` seconds,
so a revocation made through another gateway process takes effect within that time (at
once in the process that made it). When the database cannot be asked, a key seen before
keeps working and an unknown one gets a 503.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import InvalidGatewayKey, KeyStoreUnavailable
from storage.accounts import KeyGrant, fingerprint

ANONYMOUS = "anonymous"
CACHE_SIZE = 100_000

Lookup = Callable[[str], Awaitable[KeyGrant | None]]


@dataclass(frozen=True, slots=True)
class Caller:
    """``owner`` scopes history: a user id, or a key's fingerprint."""

    owner: str
    key_fingerprint: str | None


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key in ``Authorization: Bearer ...`` or else ``api_key``: the ``api-key`` header
    Azure clients send, or the ``x-api-key`` of Anthropic's (the same key either way is the
    same caller)."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    return None


class Authenticator:
    def __init__(
        self,
        gateway_keys: frozenset[str],
        managed: bool,
        lookup: Lookup | None = None,
        ttl: float = 5.0,
    ) -> None:
        self._managed = managed
        self._fingerprints = frozenset(fingerprint(key) for key in gateway_keys)
        self._lookup = lookup
        self._ttl = ttl
        self._cache: OrderedDict[str, tuple[KeyGrant | None, float]] = OrderedDict()

    @property
    def fingerprints(self) -> frozenset[str]:
        return self._fingerprints

    def forget(self, digest: str) -> None:
        """Drop what is remembered of a key (revoked, or its user disabled, just now)."""
        self._cache.pop(digest, None)

    def forget_all(self) -> None:
        self._cache.clear()

    async def identify(self, authorization: str | None, api_key: str | None) -> Caller:
        key = presented_key(authorization, api_key)
        if key is None:
            if self._managed:
                raise InvalidGatewayKey(
                    "Missing gateway key: send it as 'Authorization: Bearer <key>' "
                    "(or 'x-api-key: <key>')."
                )
            return Caller(ANONYMOUS, None)
        return await self.caller_of(fingerprint(key))

    async def caller_of(self, digest: str) -> Caller:
        """The caller a key with this fingerprint stands for, if it is still good."""
        if not self._managed or digest in self._fingerprints:
            return Caller(digest, digest)
        grant = await self._grant(digest)
        if grant is None or not grant.active:
            raise InvalidGatewayKey("Incorrect gateway key provided.")
        return Caller(grant.owner, digest)

    async def _grant(self, digest: str) -> KeyGrant | None:
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        if self._lookup is None:
            return None
        try:
            grant = await self._lookup(digest)
        except Exception as error:  # the main database is down: fall back on what we knew
            if cached is not None:
                return cached[0]
            raise KeyStoreUnavailable(
                "The gateway cannot check this key right now; try again shortly."
            ) from error
        self._cache[digest] = (grant, time.monotonic() + self._ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grant
