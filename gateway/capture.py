"""What the request path hands to the capture queue, and how the writer turns it into rows.

The request path does as little as it can: it fills an ``Exchange`` with what it already has
(the parsed request, the raw response bytes or SSE chunks with their arrival times, timings,
caller, client) and queues it. Parsing the answer, rebuilding streamed messages, hashing the
message chain and shaping rows happen in ``rows()``, called by the writer off the request path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from gateway.accumulate import StreamAccumulator
from gateway.sse import iter_data
from storage.chain import ROOT, chain, content_text, continuation_key
from storage.message_rows import message_row
from storage.rows import Record, RowSet

JSON = dict[str, Any]
TITLE_LENGTH = 80

CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_DISCONNECTED = "upstream_disconnected"


def new_id() -> str:
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID


@dataclass(slots=True)
class Exchange:
    """One proxied chat completion, as the request path saw it."""

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
    # Read back from a spool entry with no NUL in it: not journaled, not part of the record.
    nul_free: bool = field(default=False, compare=False)

    def rows(self) -> RowSet:
        answer = self._answer()
        sent = self.request.get("messages")
        valid_messages = isinstance(sent, list) and all(isinstance(m, dict) for m in sent)
        messages: list[JSON] = sent if valid_messages else []  # type: ignore[assignment]
        answered = [answer.choices[0][0]] if answer.choices else []
        linked = list(chain(messages))
        conversation_id = self._conversation_id(messages + answered, [d for d, _, _ in linked])
        params = {k: v for k, v in self.request.items() if k != "messages" or not valid_messages}
        message_rows: list[JSON] = []
        request_hash: str | None = None
        for digest, parent, message in linked:
            message_rows.append(
                message_row(conversation_id, digest, parent, message, self.started_at)
            )
            request_hash = digest
        response_hash: str | None = None
        extra_choices = []
        for index, (message, finish_reason) in enumerate(answer.choices):
            if index == 0:
                for digest, parent, same in chain([message], request_hash or ROOT):
                    message_rows.append(
                        message_row(conversation_id, digest, parent, same, self.started_at)
                    )
                    response_hash = digest
            else:
                extra_choices.append(
                    {"index": index, "message": message, "finish_reason": finish_reason}
                )
        usage = answer.usage or {}
        completion = {
            "id": self.id,
            "response_id": answer.id,
            "conversation_id": conversation_id,
            "owner": self.owner,
            "key_fingerprint": self.key_fingerprint,
            "end_user": _short(self.request.get("user"), 255),
            "requested_model": _short(self.request.get("model"), 255),
            "response_model": _short(answer.model, 255),
            "params": orjson.dumps(params).decode(),
            "metadata": _json_or_none(self.request.get("metadata")),
            "request_hash": request_hash,
            "request_message_count": len(messages),
            "response_hash": response_hash,
            "extra_choices": orjson.dumps(extra_choices).decode() if extra_choices else None,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": _int(usage.get("prompt_tokens")),
            "completion_tokens": _int(usage.get("completion_tokens")),
            "total_tokens": _int(usage.get("total_tokens")),
            "cached_tokens": _int(_get(usage, "prompt_tokens_details", "cached_tokens")),
            "reasoning_tokens": _int(_get(usage, "completion_tokens_details", "reasoning_tokens")),
            "usage": _json_or_none(answer.usage),
            "status_code": self.status,
            "error_type": _short(self.error_type or answer.error_type, 255),
            "error_message": self.error_message or answer.error_message,
            "client_ip": self.client_ip,
            "user_agent": _short(self.user_agent, 512),
            "stream": self.stream,
            "started_at": self.started_at,
            "ttft_ms": answer.ttft_ms if answer.ttft_ms is not None else None,
            "latency_ms": self.latency_ms,
            "upstream_created": _int(answer.created),
            "system_fingerprint": _short(answer.system_fingerprint, 255),
        }
        conversation = {
            "id": conversation_id,
            "owner": self.owner,
            "client_conversation_id": _short(self.conversation_header, 255),
            "title": _title(messages),
            "created_at": self.started_at,
            "updated_at": self.started_at,
        }
        return RowSet(
            completion=completion,
            conversation=conversation,
            messages=message_rows,
            resent=_resent(messages),
            nul_free=self.nul_free,
        )

    def journal(self) -> JSON:
        """Everything ``rows()`` needs, as JSON, for the spool (bytes kept as latin-1 text,
        which maps each byte to one character and back)."""
        return {
            "kind": "chat",
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

    def _conversation_id(self, exchange: list[JSON], digests: list[str]) -> str:
        """Named by the client's header, else by the conversation's first exchange.

        Both are namespaced by owner: two callers naming the same conversation, or sending
        the same words, never share one. A first request and its answer start a
        conversation; a later request that resends them (see ``continuation_key``) lands
        in it, whichever process writes it and in whatever order. A request with no
        assistant message and no answer (an error, say) is a conversation of its own.
        """
        if self.conversation_header:
            scoped = f"{self.owner}\n{self.conversation_header}"
        else:
            key = continuation_key(exchange, digests)
            if key is None:
                return self.id
            scoped = f"{self.owner}\nthread\n{key}"
        return hashlib.sha256(scoped.encode()).hexdigest()[:32]

    def _answer(self) -> Answer:
        if self.stream and self.chunks and 200 <= self.status < 300:
            return _streamed_answer(self.chunks, self.cut_short)
        return _json_answer(self.response_body, self.status, self.cut_short)


_JOURNALED = tuple(name for name in Exchange.__dataclass_fields__ if name != "nul_free")


@dataclass(slots=True)
class Answer:
    id: str | None = None
    model: str | None = None
    created: int | None = None
    system_fingerprint: str | None = None
    usage: JSON | None = None
    choices: list[tuple[JSON, str | None]] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_ms: float | None = None
    error_type: str | None = None
    error_message: str | None = None


def _streamed_answer(chunks: list[tuple[float, bytes]], cut_short: str | None) -> Answer:
    accumulator = StreamAccumulator()
    ttft_ms: float | None = None
    for arrived_ms, raw in chunks:
        for data in iter_data([raw]):
            if data == b"[DONE]":
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict) and accumulator.add(chunk) and ttft_ms is None:
                ttft_ms = arrived_ms
    choices = accumulator.choices()
    if cut_short:
        choices = [(message, finish or cut_short) for message, finish in choices]
        if not choices:
            choices = [({"role": "assistant", "content": None}, cut_short)]
    return Answer(
        id=accumulator.id,
        model=accumulator.model,
        created=accumulator.created,
        system_fingerprint=accumulator.system_fingerprint,
        usage=accumulator.usage,
        choices=choices,
        finish_reason=choices[0][1] if choices else None,
        ttft_ms=ttft_ms,
    )


def _json_answer(body: bytes, status: int, cut_short: str | None) -> Answer:
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        return Answer(
            finish_reason=cut_short,
            error_message=body[:2000].decode(errors="replace") if status >= 400 and body else None,
        )
    if status >= 400 or "error" in parsed:
        error = parsed.get("error")
        if isinstance(error, dict):
            kind = error.get("type") or error.get("code")
            return Answer(
                error_type=str(kind) if kind else None,
                error_message=_str_or_none(error.get("message")),
            )
        return Answer(error_message=orjson.dumps(parsed)[:2000].decode(errors="replace"))
    choices = []
    for choice in parsed.get("choices") or ():
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            choices.append((choice["message"], choice.get("finish_reason")))
    usage = parsed.get("usage")
    return Answer(
        id=_str_or_none(parsed.get("id")),
        model=_str_or_none(parsed.get("model")),
        created=parsed.get("created") if isinstance(parsed.get("created"), int) else None,
        system_fingerprint=_str_or_none(parsed.get("system_fingerprint")),
        usage=usage if isinstance(usage, dict) else None,
        choices=choices,
        finish_reason=choices[0][1] if choices else cut_short,
    )


@dataclass(slots=True)
class RequestLog:
    """Any other proxied ``/v1`` request: a light row, no content."""

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

    def journal(self) -> JSON:
        return {
            "kind": "log",
            **{name: getattr(self, name) for name in self.__dataclass_fields__},
            "started_at": self.started_at.isoformat(),
        }

    @classmethod
    def from_journal(cls, entry: JSON) -> RequestLog:
        fields = {k: v for k, v in entry.items() if k != "kind"}
        fields["started_at"] = datetime.fromisoformat(entry["started_at"])
        return cls(**fields)

    def rows(self) -> RowSet:
        return RowSet(
            request_log={
                "id": self.id,
                "owner": self.owner,
                "key_fingerprint": self.key_fingerprint,
                "method": self.method,
                "path": self.path[:1024],
                "status_code": self.status,
                "error_type": self.error_type,
                "latency_ms": self.latency_ms,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "client_ip": self.client_ip,
                "user_agent": _short(self.user_agent, 512),
                "started_at": self.started_at,
            }
        )


def to_entry(record: Record) -> bytes:
    """A captured record as one line of the spool."""
    assert isinstance(record, (Exchange, RequestLog))
    return orjson.dumps(record.journal())


def from_entry(entry: bytes) -> Record:
    """A spooled record back as the record it was."""
    data = orjson.loads(entry)
    if data.get("kind") == "chat":
        exchange = Exchange.from_journal(data)
        # JSON writes a NUL in any string as \u0000, and a response body's bytes are kept
        # as text: an entry without those six characters has no NUL anywhere in it.
        exchange.nul_free = b"\\u0000" not in entry
        return exchange
    if data.get("kind") == "log":
        return RequestLog.from_journal(data)
    raise ValueError(f"unknown record kind {data.get('kind')!r}")


def _resent(messages: list[JSON]) -> int:
    """How many messages, from the first, end with the request's last assistant message:
    history a chat client resends, which the turn that answered it stored."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return index + 1
    return 0


def _title(messages: list[JSON]) -> str | None:
    """The first words of the first user message that has any."""
    for message in messages:
        if message.get("role") == "user":
            text = content_text(message)
            if text and (words := _first_words(text)):
                return words
    return None


def _first_words(text: str) -> str:
    """``text`` with its whitespace collapsed, cut to ``TITLE_LENGTH``. A prompt may be
    200 KB: its head is looked at first, and all of it only when the head, collapsed,
    is too short to tell (the head's words are the first words of the whole)."""
    head = text[: 4 * TITLE_LENGTH]
    words = " ".join(head.split())
    if len(words) <= TITLE_LENGTH and len(head) < len(text):
        words = " ".join(text.split())
    return words if len(words) <= TITLE_LENGTH else words[: TITLE_LENGTH - 1] + "…"


def _get(mapping: JSON, *path: str) -> Any:
    value: Any = mapping
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _short(value: Any, length: int) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text[:length]


def _json_or_none(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()
