"""OpenAI's Responses API (``POST /v1/responses``): the request's input items and the
answer's output items as one message chain, the response's status as the finish reason, its
usage, and the conversation it belongs to.

The client gets the upstream's bytes unchanged (the gateway adds nothing to this request).
A stream's terminal event (``response.completed``, ``.incomplete``, ``.failed``) carries
the whole response, which is what is recorded; a stream cut short before it is rebuilt
from the items and deltas it delivered.

Input items are stored as messages, in order, then the output items after them: a string
``input`` is the one user message it stands for. A request that names its
``previous_response_id`` sends only what is new; the writer moves it into the conversation
of that response, under its last item (``RowSet.moved``), whichever replica recorded it.
A request that resends earlier items instead (a stateless agent loop) continues its
conversation by the rule chat follows (``continuation_key``), and what it resends is stored
once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from capture import columns
from capture.answers import conversation_key, read_body
from capture.api import Api, InvalidBody
from capture.chain import ROOT, chain, exchange_key
from capture.chat import parse_json_object, resent_count, title
from capture.exchange import UPSTREAM_DISCONNECTED, Exchange
from capture.message_rows import message_row
from capture.rows import (
    COMPLETIONS,
    CONVERSATIONS,
    MESSAGES,
    RowSet,
    dig,
    integer,
    json_or_none,
    short,
    text_or_none,
)
from capture.sse import EventSplitter, event_data

JSON = dict[str, Any]

# Items only an answer holds; a request that has any resends an earlier answer.
OUTPUT_TYPES = frozenset(
    {
        "reasoning",
        "function_call",
        "custom_tool_call",
        "web_search_call",
        "file_search_call",
        "computer_call",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
    }
)


def parse_request(body: bytes) -> JSON:
    request = parse_json_object(body)
    given = request.get("input")
    if given is not None and not isinstance(given, str | list):
        raise InvalidBody("'input' must be a string or an array of input items.", param="input")
    return request


def input_items(request: JSON) -> list[Any]:
    """The request's input as items: a string is the user message it stands for."""
    given = request.get("input")
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return given if isinstance(given, list) else []


def is_output(item: Any) -> bool:
    """An item only an answer holds: an assistant's message, a call it made, its reasoning."""
    if not isinstance(item, dict):
        return False
    return item.get("role") == "assistant" or item.get("type") in OUTPUT_TYPES


@dataclass(slots=True)
class ResponsesExchange(Exchange):
    """One proxied call of the Responses API."""

    kind = "responses"

    def rows(self) -> RowSet:
        answer = self._answer()
        items = input_items(self.request)
        linked = list(chain(items))
        request_hash = linked[-1][0] if linked else None
        answered = list(chain(answer.output, request_hash or ROOT))
        response_hash = answered[-1][0] if answered else None
        previous = text_or_none(self.request.get("previous_response_id"))
        conversation_id = self._conversation_id(items + answer.output, previous)
        message_rows = [
            message_row(conversation_id, digest, parent, item, self.started_at)
            for digest, parent, item in linked + answered
        ]
        params = {k: v for k, v in self.request.items() if k != "input"}
        usage = answer.usage or {}
        completion = self.completion_row(
            conversation_id,
            answer.error_type,
            answer.error_message,
            response_id=short(answer.id, columns.NAME),
            response_model=short(answer.model, columns.NAME),
            params=orjson.dumps(params).decode(),
            metadata=json_or_none(self.request.get("metadata")),
            request_hash=request_hash,
            request_message_count=len(items),
            response_hash=response_hash,
            extra_choices=None,
            finish_reason=short(answer.finish_reason, columns.FINISH_REASON),
            prompt_tokens=integer(usage.get("input_tokens")),
            completion_tokens=integer(usage.get("output_tokens")),
            total_tokens=integer(usage.get("total_tokens")),
            cached_tokens=integer(dig(usage, "input_tokens_details", "cached_tokens")),
            reasoning_tokens=integer(dig(usage, "output_tokens_details", "reasoning_tokens")),
            usage=json_or_none(answer.usage),
            ttft_ms=answer.ttft_ms,
            upstream_created=integer(answer.created),
            system_fingerprint=None,
        )
        conversation = self.conversation_row(
            conversation_id, title(items), self._named_conversation()
        )
        return RowSet(
            {COMPLETIONS: [completion], CONVERSATIONS: [conversation], MESSAGES: message_rows},
            resent=resent_count(items, is_output),
            nul_free=self.nul_free,
            follows=previous if previous and self._named_conversation() is None else None,
        )

    def _named_conversation(self) -> str | None:
        """The conversation the client names: ``X-Conversation-Id``, or OpenAI's
        ``conversation`` parameter (its id, or an object with it)."""
        if self.conversation_header:
            return self.conversation_header
        named = self.request.get("conversation")
        if isinstance(named, dict):
            named = named.get("id")
        return named if isinstance(named, str) and named else None

    def _conversation_id(self, exchange: list[Any], previous: str | None) -> str:
        """Named by the client; else that of the response it follows up (the writer finds
        it; until then, one named after that response, where its other follow-ups go); else
        by its first exchange, as chat's; else its own."""
        named = self._named_conversation()
        if named is not None:
            return conversation_key(self.owner, named)
        if previous is not None:
            return conversation_key(self.owner, "previous", previous)
        key = continuation_key(exchange)
        return self.id if key is None else conversation_key(self.owner, "responses", key)

    def _answer(self) -> Answer:
        if self.stream and self.chunks and 200 <= self.status < 300:
            return _streamed_answer(self.chunks, self.cut_short)
        return _json_answer(self.response_body, self.status, self.cut_short)


@dataclass(slots=True)
class Answer:
    id: str | None = None
    model: str | None = None
    created: int | None = None
    usage: JSON | None = None
    output: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_ms: float | None = None
    error_type: str | None = None
    error_message: str | None = None


def finish_reason(response: JSON) -> str | None:
    """A response's status as a finish reason: ``stop`` when completed; why it is
    incomplete (``max_output_tokens``, ``content_filter``); else the status itself
    (``failed``, ``cancelled``, ``queued``, ``in_progress``)."""
    status = response.get("status")
    if status == "completed":
        return "stop"
    if status == "incomplete":
        reason = dig(response, "incomplete_details", "reason")
        return reason if isinstance(reason, str) else "incomplete"
    return status if isinstance(status, str) else None


def _from_response(response: JSON, answer: Answer) -> Answer:
    """``answer`` filled from a whole response object."""
    answer.id = text_or_none(response.get("id")) or answer.id
    answer.model = text_or_none(response.get("model")) or answer.model
    answer.created = integer(response.get("created_at")) or answer.created
    usage = response.get("usage")
    answer.usage = usage if isinstance(usage, dict) else answer.usage
    output = response.get("output")
    if isinstance(output, list):
        answer.output = output
    answer.finish_reason = finish_reason(response)
    error = response.get("error")
    if isinstance(error, dict):
        answer.error_type = text_or_none(error.get("code")) or text_or_none(error.get("type"))
        answer.error_message = text_or_none(error.get("message"))
    return answer


def _json_answer(body: bytes, status: int, cut_short: str | None) -> Answer:
    read = read_body(body, status, _is_error)
    if read.parsed is None:
        return Answer(
            finish_reason=None if read.whole else cut_short,
            error_type=read.error_type,
            error_message=read.error_message,
        )
    return _from_response(read.parsed, Answer())


def _is_error(answer: JSON) -> bool:
    """An error object, not a response (whose ``error`` says why it failed, if it did)."""
    return isinstance(answer.get("error"), dict) and "output" not in answer


_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _streamed_answer(chunks: list[tuple[float, bytes]], cut_short: str | None) -> Answer:
    """The terminal event's response; or, where the stream stopped before it, the answer
    rebuilt from what it delivered."""
    answer = Answer()
    rebuilt = _Rebuilt()
    terminal: JSON | None = None
    splitter = EventSplitter()  # the relay spools whole events; this holds for any cut
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
            if not isinstance(kind, str):
                continue
            if answer.ttft_ms is None and kind.endswith(".delta"):
                answer.ttft_ms = arrived_ms
            response = event.get("response")
            if kind in _TERMINAL and isinstance(response, dict):
                terminal = response
            elif isinstance(response, dict):  # response.created, .in_progress, .queued
                answer.id = text_or_none(response.get("id")) or answer.id
                answer.model = text_or_none(response.get("model")) or answer.model
                answer.created = integer(response.get("created_at")) or answer.created
            elif kind == "error":
                answer.error_type = text_or_none(event.get("code")) or "error"
                answer.error_message = text_or_none(event.get("message"))
            else:
                rebuilt.add(kind, event)
    if terminal is not None:
        error_type, error_message = answer.error_type, answer.error_message
        _from_response(terminal, answer)
        answer.error_type = answer.error_type or error_type
        answer.error_message = answer.error_message or error_message
        return answer
    answer.output = rebuilt.items()
    if cut_short:
        answer.finish_reason = cut_short
    elif answer.error_type is not None:
        answer.finish_reason = "failed"
    else:  # the upstream ended the stream without its terminal event
        answer.finish_reason = UPSTREAM_DISCONNECTED
    return answer


class _Rebuilt:
    """Output items of a stream cut short, from its events: an item done is kept as sent;
    one under way is its ``output_item.added`` with the text, arguments and reasoning
    summary deltas that followed."""

    def __init__(self) -> None:
        self._items: dict[int, JSON] = {}
        self._texts: dict[tuple[int, str, int], list[str]] = {}
        self._done: set[int] = set()

    def add(self, kind: str, event: JSON) -> None:
        index = event.get("output_index")
        if not isinstance(index, int):
            return
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict):
                self._items[index] = dict(item)
                if kind == "response.output_item.done":
                    self._done.add(index)
            return
        if index in self._done:
            return
        part = event.get("part")
        if isinstance(part, dict) and kind in _PARTS:
            key, at = _PARTS[kind]
            position = event.get(at)
            item = self._items.setdefault(index, {"type": _TYPE_OF[key]})
            _put(item, key, position if isinstance(position, int) else 0, dict(part))
            return
        delta = event.get("delta")
        if not isinstance(delta, str):
            return
        where = {
            "response.output_text.delta": "content",
            "response.refusal.delta": "refusal",
            "response.function_call_arguments.delta": "arguments",
            "response.custom_tool_call_input.delta": "input",
            "response.reasoning_summary_text.delta": "summary",
            "response.reasoning_text.delta": "reasoning",
        }.get(kind)
        if where is None:
            return
        part = event.get("summary_index") if where == "summary" else event.get("content_index")
        self._texts.setdefault((index, where, part if isinstance(part, int) else 0), []).append(
            delta
        )

    def items(self) -> list[JSON]:
        for (index, where, part), pieces in sorted(self._texts.items()):
            if index in self._done:
                continue
            item = self._items.setdefault(index, {"type": _TYPE_OF[where]})
            text = "".join(pieces)
            if where in ("arguments", "input"):
                item[where] = text
            elif where == "summary":
                _put(item, "summary", part, {"type": "summary_text", "text": text})
            elif where == "reasoning":
                _put(item, "content", part, {"type": "reasoning_text", "text": text})
            elif where == "refusal":
                _put(item, "content", part, {"type": "refusal", "refusal": text})
            else:
                _put(item, "content", part, {"type": "output_text", "text": text})
        for index in self._items:
            if index not in self._done and self._items[index].get("status") == "in_progress":
                self._items[index]["status"] = "incomplete"
        return [self._items[index] for index in sorted(self._items)]


# Events that announce a part of an item: where it goes, and the field saying at which place.
_PARTS = {
    "response.content_part.added": ("content", "content_index"),
    "response.reasoning_summary_part.added": ("summary", "summary_index"),
}
_TYPE_OF = {
    "content": "message",
    "refusal": "message",
    "arguments": "function_call",
    "input": "custom_tool_call",
    "summary": "reasoning",
    "reasoning": "reasoning",
}


def _put(item: JSON, key: str, index: int, part: JSON) -> None:
    """``part`` at ``index`` of the list ``item[key]``, where the stream had announced it or
    after what is there."""
    parts = item.get(key)
    if not isinstance(parts, list):
        parts = item[key] = []
    if 0 <= index < len(parts) and isinstance(parts[index], dict):
        parts[index] = {**parts[index], **part}
    else:
        parts.append(part)


def match_form(item: Any) -> Any:
    """What says which item it is when a client sends it back: a reasoning item is not
    needed to say so (clients drop it, or its summary); an assistant's message is its text;
    a call its id, name and arguments; a message its role and text or parts; anything else
    without the ids and statuses the upstream adds."""
    if not isinstance(item, dict):
        return item
    kind = item.get("type")
    if kind == "reasoning":
        return None
    if kind in ("function_call", "custom_tool_call"):
        return {
            "type": kind,
            "call_id": item.get("call_id"),
            "name": item.get("name"),
            "arguments": item.get("arguments", item.get("input")),
        }
    if "role" in item:
        return {"role": item.get("role"), "content": _content_form(item.get("content"))}
    return {k: v for k, v in item.items() if k not in ("id", "status")}


def _content_form(content: Any) -> Any:
    """Text parts, of either direction, as their text: a string and the parts that hold it
    are the same message."""
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text")
        for part in content
    ):
        return "".join(str(part.get("text", "")) for part in content)
    return content


def continuation_key(items: list[Any]) -> str | None:
    """The identity of the first exchange in ``items``: everything up to and including the
    first item of an answer (in match form; reasoning left out). None when there is none.
    A first request with its answer, and every later request that resends them, share it."""
    return exchange_key(items, match_form, is_output)


def is_terminal(event: bytes) -> bool:
    """A Responses stream's last event: the one that carries the whole response."""
    return event.startswith(_TERMINAL_LINES)


_TERMINAL_LINES = tuple(f"event: {kind}\n".encode() for kind in sorted(_TERMINAL))

API = Api(record=ResponsesExchange, parse=parse_request, last_event=is_terminal)
