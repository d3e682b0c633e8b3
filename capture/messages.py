"""Anthropic's Messages API (``POST /v1/messages``): the request's system prompt and
messages and the answer's content blocks as one message chain, ``stop_reason`` as the finish
reason, the usage with its cache reads and writes, and the conversation it belongs to.

The client gets the upstream's bytes unchanged (the gateway adds nothing to this request).
A stream's ``message_start`` carries the message's id, model and input usage, its
``message_delta`` the stop reason and the final usage; the content blocks are rebuilt from
``content_block_start`` and the deltas that follow (text, a tool call's JSON, thinking and
its signature), which is also how a stream cut short is recorded.

The system prompt, when there is one, is stored as the chain's first message (``{"role":
"system", "content": ...}``, as it was sent), then the messages, then the answer as the
assistant message it is (``{"role": "assistant", "content": [blocks]}``). A conversation
continues by chat's rule: a request that resends an earlier exchange lands in its
conversation, recognised by what a client keeps when it sends it back (the cache markers
Claude Code moves from turn to turn, and the thinking blocks a client may drop, do not count).

The cache markers (``cache_control``) are not stored in the messages: Claude Code puts one
on each turn's newest message and moves it on the next turn, which would store that message
twice, with the answer after it. The record keeps where they were (``MARKS`` in its
parameters), and ``with_marks`` puts them back: the request is rebuilt as it was sent, and a
turn stores its new message and its answer, as a chat turn does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from capture import columns
from capture.answers import conversation_key, read_body
from capture.api import Api, InvalidBody
from capture.chain import ROOT, chain, exchange_key
from capture.chat import is_assistant, parse_json_object, resent_count, title
from capture.exchange import UPSTREAM_DISCONNECTED, Exchange
from capture.message_rows import message_row
from capture.rows import (
    COMPLETIONS,
    CONVERSATIONS,
    MESSAGES,
    RowSet,
    integer,
    json_or_none,
    short,
    text_or_none,
)
from capture.sse import EventSplitter, event_data

JSON = dict[str, Any]


def parse_request(body: bytes) -> JSON:
    request = parse_json_object(body)
    if not isinstance(request.get("messages"), list):
        raise InvalidBody("messages: Field required", param="messages")
    return request


def request_messages(request: JSON) -> list[Any]:
    """The system prompt (if any) as the first message, then the messages as sent."""
    sent = request.get("messages")
    messages = list(sent) if isinstance(sent, list) else []
    system = request.get("system")
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


@dataclass(slots=True)
class MessagesExchange(Exchange):
    """One proxied call of Anthropic's Messages API."""

    kind = "messages"

    def rows(self) -> RowSet:
        answer = self._answer()
        sent, marks = unmarked(request_messages(self.request))
        linked = list(chain(sent))
        request_hash = linked[-1][0] if linked else None
        reply = [{"role": "assistant", "content": answer.content}] if answer.replied else []
        answered = list(chain(reply, request_hash or ROOT))
        response_hash = answered[-1][0] if answered else None
        conversation_id = self._conversation_id(sent + reply)
        message_rows = [
            message_row(conversation_id, digest, parent, message, self.started_at)
            for digest, parent, message in linked + answered
        ]
        params = {k: v for k, v in self.request.items() if k not in ("messages", "system")}
        if marks:
            params[MARKS] = marks
        usage = answer.usage
        fresh = integer(usage.get("input_tokens"))
        written = integer(usage.get("cache_creation_input_tokens"))
        read = integer(usage.get("cache_read_input_tokens"))
        output = integer(usage.get("output_tokens"))
        prompt = None if fresh is None else fresh + (written or 0) + (read or 0)
        total = None if prompt is None and output is None else (prompt or 0) + (output or 0)
        completion = self.completion_row(
            conversation_id,
            answer.error_type,
            answer.error_message,
            response_id=short(answer.id, columns.NAME),
            response_model=short(answer.model, columns.NAME),
            params=orjson.dumps(params).decode(),
            metadata=json_or_none(self.request.get("metadata")),
            request_hash=request_hash,
            request_message_count=len(sent),
            response_hash=response_hash,
            extra_choices=None,
            finish_reason=short(answer.finish_reason, columns.FINISH_REASON),
            prompt_tokens=prompt,
            completion_tokens=output,
            total_tokens=total,
            cached_tokens=read,
            cache_write_tokens=written,
            reasoning_tokens=None,  # Anthropic counts thinking in output_tokens, not apart
            usage=json_or_none(usage or None),
            ttft_ms=answer.ttft_ms,
            upstream_created=None,
            system_fingerprint=None,
        )
        conversation = self.conversation_row(conversation_id, title(sent), self.conversation_header)
        return RowSet(
            {COMPLETIONS: [completion], CONVERSATIONS: [conversation], MESSAGES: message_rows},
            resent=resent_count(sent),
            nul_free=self.nul_free,
        )

    def _conversation_id(self, exchange: list[Any]) -> str:
        """Named by the client's header, else by the conversation's first exchange (chat's
        rule), else its own."""
        if self.conversation_header:
            return conversation_key(self.owner, self.conversation_header)
        key = exchange_key(exchange, match_form, is_assistant)
        return self.id if key is None else conversation_key(self.owner, "messages", key)

    def _answer(self) -> Answer:
        if self.stream and self.chunks and 200 <= self.status < 300:
            return _streamed_answer(self.chunks, self.cut_short)
        return _json_answer(self.response_body, self.status, self.cut_short)


@dataclass(slots=True)
class Answer:
    id: str | None = None
    model: str | None = None
    usage: JSON = field(default_factory=dict)
    content: list[Any] = field(default_factory=list)
    replied: bool = False  # a message came back (perhaps cut short, perhaps empty)
    finish_reason: str | None = None
    ttft_ms: float | None = None
    error_type: str | None = None
    error_message: str | None = None


def _json_answer(body: bytes, status: int, cut_short: str | None) -> Answer:
    read = read_body(body, status, _is_error)
    message = read.parsed
    if message is None:
        return Answer(
            finish_reason=None if read.whole else cut_short,
            error_type=read.error_type,
            error_message=read.error_message,
        )
    content = message.get("content")
    usage = message.get("usage")
    return Answer(
        id=text_or_none(message.get("id")),
        model=text_or_none(message.get("model")),
        usage=usage if isinstance(usage, dict) else {},
        content=content if isinstance(content, list) else [],
        replied=True,
        finish_reason=text_or_none(message.get("stop_reason")),
    )


def _is_error(answer: JSON) -> bool:
    return answer.get("type") == "error"


def _streamed_answer(chunks: list[tuple[float, bytes]], cut_short: str | None) -> Answer:
    """The message a stream delivered, rebuilt from its events; cut short, what came."""
    answer = Answer(replied=True)
    blocks = _Blocks()
    stopped = False
    splitter = EventSplitter()
    for arrived_ms, raw in chunks:
        for whole in splitter.feed(raw):
            data = event_data(whole)
            if data is None:
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind == "message_start" and isinstance(event.get("message"), dict):
                message = event["message"]
                answer.id = text_or_none(message.get("id"))
                answer.model = text_or_none(message.get("model"))
                if isinstance(message.get("usage"), dict):
                    answer.usage = dict(message["usage"])
            elif kind == "content_block_delta":
                if answer.ttft_ms is None:
                    answer.ttft_ms = arrived_ms
                blocks.delta(event)
            elif kind == "content_block_start":
                blocks.start(event)
            elif kind == "content_block_stop":
                blocks.stop(event)
            elif kind == "message_delta":
                delta = event.get("delta")
                if isinstance(delta, dict) and "stop_reason" in delta:
                    answer.finish_reason = text_or_none(delta.get("stop_reason"))
                if isinstance(event.get("usage"), dict):  # cumulative: it wins
                    answer.usage.update((k, v) for k, v in event["usage"].items() if v is not None)
            elif kind == "message_stop":
                stopped = True
            elif kind == "error" and isinstance(event.get("error"), dict):
                answer.error_type = text_or_none(event["error"].get("type")) or "error"
                answer.error_message = text_or_none(event["error"].get("message"))
    answer.content = blocks.content()
    if not stopped:
        answer.finish_reason = cut_short or (
            "error" if answer.error_type is not None else UPSTREAM_DISCONNECTED
        )
    return answer


class _Blocks:
    """Content blocks from a stream's events: each ``content_block_start``'s block, its
    text, thinking and signature deltas appended, a tool call's JSON parsed when its block
    stops (cut before, the JSON that came is kept as text in ``input``)."""

    def __init__(self) -> None:
        self._blocks: dict[int, JSON] = {}
        self._json: dict[int, list[str]] = {}

    def start(self, event: JSON) -> None:
        index, block = event.get("index"), event.get("content_block")
        if isinstance(index, int) and isinstance(block, dict):
            self._blocks[index] = dict(block)

    def delta(self, event: JSON) -> None:
        index, delta = event.get("index"), event.get("delta")
        if not isinstance(index, int) or not isinstance(delta, dict):
            return
        block = self._blocks.setdefault(index, {"type": "text", "text": ""})
        kind = delta.get("type")
        if kind == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            self._json.setdefault(index, []).append(delta["partial_json"])
            return
        for name in _DELTA_FIELDS.get(str(kind), ()):
            if isinstance(delta.get(name), str):
                block[name] = str(block.get(name) or "") + delta[name]
        if kind == "citations_delta" and isinstance(delta.get("citation"), dict):
            block.setdefault("citations", []).append(delta["citation"])

    def stop(self, event: JSON) -> None:
        index = event.get("index")
        if isinstance(index, int):
            self._settle(index)

    def _settle(self, index: int) -> None:
        pieces = self._json.pop(index, None)
        if pieces is None or index not in self._blocks:
            return
        text = "".join(pieces)
        try:
            self._blocks[index]["input"] = orjson.loads(text) if text else {}
        except orjson.JSONDecodeError:
            self._blocks[index]["input"] = text  # cut mid-way: what came, as it came

    def content(self) -> list[JSON]:
        for index in list(self._json):
            self._settle(index)
        return [self._blocks[index] for index in sorted(self._blocks)]


_DELTA_FIELDS = {
    "text_delta": ("text",),
    "thinking_delta": ("thinking",),
    "signature_delta": ("signature",),
}

# What a client may change in a message it sends back: Claude Code moves its cache markers
# from turn to turn; a client may send a string for one text block, or drop the thinking
# blocks of an earlier answer (the API ignores them there).
_UNKEPT_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def match_form(message: Any) -> Any:
    """The part of a message that says which message it is."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, list):
        blocks = [
            _without_cache_marks(block)
            for block in content
            if not (isinstance(block, dict) and block.get("type") in _UNKEPT_BLOCKS)
        ]
        if all(isinstance(b, dict) and b.get("type") == "text" for b in blocks):
            content = "".join(str(b.get("text", "")) for b in blocks)
        else:
            content = blocks
    return {"role": message.get("role"), "content": content}


def _without_cache_marks(block: Any) -> Any:
    if not isinstance(block, dict):
        return block
    kept = {k: v for k, v in block.items() if k not in ("cache_control", "citations")}
    if isinstance(kept.get("content"), list):  # a tool result's blocks
        kept["content"] = [_without_cache_marks(part) for part in kept["content"]]
    return kept


# The parameter a record keeps its request's cache markers in: [message, block, marker], or
# [message, block, part, marker] for a part of a tool result's content. Not an API field.
MARKS = "__cache_marks"


def unmarked(messages: list[Any]) -> tuple[list[Any], list[list[Any]]]:
    """The messages without their blocks' ``cache_control``, and where each was."""
    marks: list[list[Any]] = []
    bare: list[Any] = []
    for m, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or b"cache_control" not in orjson.dumps(content):
            bare.append(message)
            continue
        blocks = []
        for b, block in enumerate(content):
            if isinstance(block, dict) and "cache_control" in block:
                marks.append([m, b, block["cache_control"]])
                block = {k: v for k, v in block.items() if k != "cache_control"}
            inner = block.get("content") if isinstance(block, dict) else None
            if isinstance(inner, list):
                parts = []
                for p, part in enumerate(inner):
                    if isinstance(part, dict) and "cache_control" in part:
                        marks.append([m, b, p, part["cache_control"]])
                        part = {k: v for k, v in part.items() if k != "cache_control"}
                    parts.append(part)
                block = {**block, "content": parts}
            blocks.append(block)
        bare.append({**message, "content": blocks})
    return bare, marks


def with_marks(messages: list[Any], marks: Any) -> list[Any]:
    """``messages`` with the cache markers ``unmarked`` took out put back where they were."""
    if not isinstance(marks, list) or not marks:
        return messages
    marked = list(messages)
    for mark in marks:
        if not isinstance(mark, list) or len(mark) not in (3, 4):
            continue
        m, b = mark[0], mark[1]
        try:
            message = marked[m] = {**marked[m], "content": list(marked[m]["content"])}
            block = message["content"][b] = dict(message["content"][b])
            if len(mark) == 3:
                block["cache_control"] = mark[2]
            else:
                parts = block["content"] = list(block["content"])
                parts[mark[2]] = {**parts[mark[2]], "cache_control": mark[3]}
        except (IndexError, KeyError, TypeError):
            continue  # a message the record no longer holds (its content dropped)
    return marked


def is_message_stop(event: bytes) -> bool:
    """A Messages stream's last event."""
    return event.startswith(b"event: message_stop")


API = Api(record=MessagesExchange, parse=parse_request, last_event=is_message_stop)
