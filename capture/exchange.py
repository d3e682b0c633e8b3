"""The records the request path fills: an ``Exchange`` for a call of a captured API, a
``RequestLog`` for any other proxied request.

The request path does as little as it can: it fills a record with what it already has (the
parsed request, the answer's raw bytes or SSE events with their arrival times, timings,
caller, client) and spools it. What the answer means (parsing it, rebuilding a stream,
hashing the message chain, shaping rows) is each API module's ``rows()``, which the writer
calls off the request path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from capture import columns
from capture.rows import REQUEST_LOGS, RowSet, json_or_none, short

JSON = dict[str, Any]

# Why an answer is partial: the record says so, never a made-up "stop".
CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_DISCONNECTED = "upstream_disconnected"


def new_id() -> str:
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID


@dataclass(slots=True)
class Exchange:
    """One call of a captured API, as the request path saw it. Each API's module subclasses
    it with its ``kind`` and its ``rows()``."""

    kind: ClassVar[str] = ""

    owner: str
    key_fingerprint: str | None
    client_ip: str | None
    user_agent: str | None
    conversation_header: str | None
    request: JSON
    stream: bool
    started_at: datetime
    id: str = field(default_factory=new_id)
    status: int = 0
    response_body: bytes = b""
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    first_byte_ms: float | None = None
    latency_ms: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    cut_short: str | None = None  # CLIENT_DISCONNECTED or UPSTREAM_DISCONNECTED
    upstream: str | None = None  # the name of the upstream that answered (or was tried last)
    # Every try ({upstream, status or error, ms}) where there was more than one; with one,
    # none (``attempts_of`` gives that one).
    attempts: list[JSON] = field(default_factory=list)
    # The caller's W3C trace context (its ``traceparent`` header), where spans are exported:
    # the record's span is then a child of the caller's (``storage/telemetry.py``).
    traceparent: str | None = None
    # Read back from a spool entry with no NUL in it: not journaled, not part of the record.
    nul_free: bool = field(default=False, compare=False)

    def rows(self) -> RowSet:
        raise NotImplementedError(f"{type(self).__name__} does not say what its rows are")

    def completion_row(
        self,
        conversation_id: str,
        error_type: str | None,
        error_message: str | None,
        **answered: Any,
    ) -> JSON:
        """The record's row of ``completions``: what every captured call fills alike (who
        called, from where, when, for how long, how it ended), then ``answered``, what its
        API's answer says. The request path's own error, if any, wins over the answer's."""
        return {
            "id": self.id,
            "call_type": self.kind,
            "conversation_id": conversation_id,
            "owner": self.owner,
            "key_fingerprint": self.key_fingerprint,
            "end_user": short(self.request.get("user"), columns.NAME),
            "requested_model": short(self.request.get("model"), columns.NAME),
            "status_code": self.status,
            "error_type": short(self.error_type or error_type, columns.NAME),
            "error_message": self.error_message or error_message,
            "client_ip": self.client_ip,
            "user_agent": short(self.user_agent, columns.USER_AGENT),
            "stream": self.stream,
            "started_at": self.started_at,
            "latency_ms": self.latency_ms,
            "upstream": short(self.upstream, columns.NAME),
            "attempts": json_or_none(self.attempts or None),
            "cache_write_tokens": None,  # the APIs that report cache writes say otherwise
            "cost_usd": None,  # the writer's to price (storage/prices.py)
            "price_version": None,
            **answered,
        }

    def conversation_row(
        self, conversation_id: str, title: str | None, named: str | None = None
    ) -> JSON:
        """The row of the conversation this record starts or continues (its totals are the
        writer's to add)."""
        return {
            "id": conversation_id,
            "owner": self.owner,
            "call_type": self.kind,
            "client_conversation_id": short(named, columns.NAME),
            "title": title,
            "created_at": self.started_at,
            "updated_at": self.started_at,
        }

    def journal(self) -> JSON:
        """Everything ``rows()`` needs, as JSON, for the spool (bytes kept as latin-1 text,
        which maps each byte to one character and back)."""
        return {
            "kind": self.kind,
            **{name: getattr(self, name) for name in _JOURNALED},
            "started_at": self.started_at.isoformat(),
            "response_body": self.response_body.decode("latin-1"),
            "chunks": [[at, raw.decode("latin-1")] for at, raw in self.chunks],
        }

    @classmethod
    def from_journal(cls, entry: JSON) -> Exchange:
        fields = {k: v for k, v in entry.items() if k != "kind"}
        fields["started_at"] = datetime.fromisoformat(entry["started_at"])
        fields["response_body"] = entry["response_body"].encode("latin-1")
        fields["chunks"] = [(at, raw.encode("latin-1")) for at, raw in entry["chunks"]]
        return cls(**fields)


_JOURNALED = tuple(name for name in Exchange.__dataclass_fields__ if name != "nul_free")


@dataclass(slots=True)
class RequestLog:
    """Any other proxied ``/v1`` request: a light row, no content."""

    kind: ClassVar[str] = "log"

    owner: str
    key_fingerprint: str | None
    method: str
    path: str
    client_ip: str | None
    user_agent: str | None
    started_at: datetime
    id: str = field(default_factory=new_id)
    status: int = 0
    error_type: str | None = None
    latency_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    upstream: str | None = None
    attempts: list[JSON] = field(default_factory=list)

    def journal(self) -> JSON:
        return {
            "kind": self.kind,
            **{name: getattr(self, name) for name in self.__dataclass_fields__},
            "started_at": self.started_at.isoformat(),
        }

    @classmethod
    def from_journal(cls, entry: JSON) -> RequestLog:
        fields = {k: v for k, v in entry.items() if k != "kind"}
        fields["started_at"] = datetime.fromisoformat(entry["started_at"])
        return cls(**fields)

    def rows(self) -> RowSet:
        row = {
            "id": self.id,
            "owner": self.owner,
            "key_fingerprint": self.key_fingerprint,
            "method": self.method,
            "path": self.path[: columns.PATH],
            "status_code": self.status,
            "error_type": self.error_type,
            "latency_ms": self.latency_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "client_ip": self.client_ip,
            "user_agent": short(self.user_agent, columns.USER_AGENT),
            "started_at": self.started_at,
            "route": route_of(self.path)[: columns.PATH],
            "upstream": short(self.upstream, columns.NAME),
            "attempts": json_or_none(self.attempts or None),
        }
        return RowSet({REQUEST_LOGS: [row]})


def attempts_of(attempts: list[JSON] | None, upstream: str | None, status: int) -> list[JSON]:
    """A record's tries, as the read APIs give them: those stored, or, where it took one
    (none stored), that one: the upstream that answered and its status."""
    if attempts:
        return attempts
    return [{"upstream": upstream, "status": status}] if upstream else []


def route_of(path: str) -> str:
    """A path with its ids as ``{id}``, so that statistics group a route's requests: a
    segment with a digit in it, 8 characters or more (``resp_68b...``, ``file-abc123``), is
    an id, not part of the route."""
    return "/".join(
        "{id}" if len(part) >= 8 and any(ch.isdigit() for ch in part) else part
        for part in path.split("/")
    )
