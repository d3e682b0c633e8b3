"""OpenAI's Responses API (``/v1/responses``) as the fake model answers it.

As with the chat answers of ``fake_upstream.responses``, what the model says is deterministic
from the request: the same model, instructions and input get the same text, function calls,
reasoning summary and usage, streamed or not. Ids are unique per call (the request's digest,
then a counter), because OpenAI keeps each response under its id: ``GET``, ``DELETE``,
``/input_items`` and ``/cancel`` then find it, as long as it is one of the last 2000.

The fake model:

- calls the function tools offered (``tools`` with ``type: "function"``: two at most, one
  with ``parallel_tool_calls: false``, the one ``tool_choice`` names), unless the input ends
  with a ``function_call_output`` or ``tool_choice`` is ``"none"``; otherwise it answers a
  message of ``X-Fake-Chunks`` text deltas;
- reasons first (a ``reasoning`` item, reasoning tokens counted) when ``reasoning`` asks for an
  effort other than ``none``, or when the model is an o-series one, as the chat answers count
  reasoning tokens for them; the item has a summary when ``reasoning.summary`` asks for one;
- stops at ``max_output_tokens``: the response is then ``incomplete``.

Request headers (with those of ``fake_upstream.app``):

- ``X-Fake-Response-Status: incomplete``  cut the output by half: status ``incomplete``,
  ``incomplete_details.reason`` ``max_output_tokens`` (stream: ``response.incomplete`` last)
- ``X-Fake-Response-Status: failed``      status ``failed`` with an ``error`` (stream: a few
  deltas, then ``response.failed``)
- ``X-Fake-Stream-Error: 1``              streams only: a few deltas, then an ``error`` event,
  and nothing after it (the stored response is ``failed``)

``background: true`` answers ``queued`` at once; the response is ``in_progress`` for
``X-Fake-Chunk-Delay`` x ``X-Fake-Chunks`` seconds, ``completed`` after, and until then
``/cancel`` makes it ``cancelled``. Only background responses can be cancelled, as at OpenAI.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from fake_upstream.responses import DEFAULT_CHUNKS, answer_words, error, missing, served_model

JSON = dict[str, Any]
HISTORY = 2000
DELTAS_BEFORE_TROUBLE = 2  # a failed or broken stream sends this many deltas first
CALL_TOKENS = 5  # output tokens a function call costs, as in the chat answers
ENCRYPTED_REASONING = "reasoning.encrypted_content"
SERVER_ERROR = (
    "An error occurred while processing your request. You can retry your request, or contact "
    "us through our help center at help.openai.com if the error persists."
)
OUTCOMES = ("completed", "incomplete", "failed")
PENDING = ("queued", "in_progress")


def request_digest(request: JSON) -> str:
    basis = orjson.dumps(
        [
            request.get("model"),
            request.get("instructions"),
            request.get("input"),
            request.get("previous_response_id"),
        ],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(basis).hexdigest()


def input_items(value: Any) -> list[JSON] | None:
    """The request's ``input`` as a list of items (a string is one user message); None when it
    is neither a string nor a list of objects."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return list(value)
    return None


def _kind(item: JSON) -> str:
    kind = item.get("type")
    return kind if isinstance(kind, str) else "message"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(items: list[JSON]) -> str:
    for item in reversed(items):
        if _kind(item) == "message" and item.get("role") == "user":
            return _text_of(item.get("content"))
    return ""


def function_tools(request: JSON, items: list[JSON]) -> list[JSON]:
    """The function tools the fake model calls: none unless offered and the turn is open."""
    tools = request.get("tools")
    choice = request.get("tool_choice")
    if not isinstance(tools, list) or choice == "none":
        return []
    if items and _kind(items[-1]) == "function_call_output":
        return []
    functions = [
        tool
        for tool in tools
        if isinstance(tool, dict)
        and tool.get("type") == "function"
        and isinstance(tool.get("name"), str)
    ]
    if isinstance(choice, dict) and choice.get("type") == "function":
        functions = [f for f in functions if f["name"] == choice.get("name")] or functions
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {
            tool.get("name")
            for tool in choice.get("tools") or []
            if isinstance(tool, dict) and tool.get("type") == "function"
        }
        functions = [f for f in functions if f["name"] in allowed]
    if request.get("parallel_tool_calls") is False:
        return functions[:1]
    return functions[:2]


def _reasoning(request: JSON) -> tuple[JSON, bool, bool]:
    """The ``reasoning`` a response echoes, whether the model reasons, and whether it
    summarises its reasoning."""
    given = request.get("reasoning")
    given = given if isinstance(given, dict) else {}
    effort = given.get("effort")
    model = request.get("model")
    o_series = isinstance(model, str) and model.startswith("o")
    thinks = effort != "none" and (bool(given) or o_series)
    summary = given.get("summary") or given.get("generate_summary")
    echo = {"effort": effort or ("medium" if thinks else None), "summary": summary}
    return echo, thinks, summary in ("auto", "concise", "detailed")


def _summary_pieces(topic: str) -> list[str]:
    return ["**Echoing the request**\n\n", "The user wrote ", f"“{topic[:40]}”", "; I echo it."]


def _tool_echo(tool: Any) -> Any:
    """A tool as a response echoes it: function tools with OpenAI's defaults filled in."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return tool
    return {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict", True),
    }


def _given(request: JSON, name: str, default: Any) -> Any:
    value = request.get(name)
    return default if value is None else value


def sse(kind: str, data: JSON) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def split(text: str, parts: int) -> list[str]:
    step = max(1, -(-len(text) // parts))
    return [text[start : start + step] for start in range(0, len(text), step)]


@dataclass
class _Item:
    """One output item: as ``response.output_item.done`` shows it, with its deltas."""

    final: JSON
    deltas: list[str]


class ResponseAnswer:
    """What the fake model answers to one ``POST /v1/responses``."""

    def __init__(
        self,
        request: JSON,
        items: list[JSON],
        *,
        sequence: int,
        topic: str,
        chunks: int = DEFAULT_CHUNKS,
        outcome: str = "completed",
        previous_tokens: int = 0,
    ) -> None:
        self.request = request
        self.digest = request_digest(request)
        self.id = f"resp_{self.digest[:40]}{sequence % 2**32:08x}"
        self.created_at = 1_700_000_000 + int(self.digest[:6], 16) % 10_000_000
        self.model = served_model(request.get("model"))
        self.reasoning, thinks, summarises = _reasoning(request)
        calls = function_tools(request, items)
        pieces = [] if calls else answer_words(topic, chunks)
        visible = len(calls) * CALL_TOKENS if calls else len(pieces)
        summary = _summary_pieces(topic) if thinks and summarises else []
        reasoning_tokens = 2 * visible + len(summary) if thinks else 0

        allowed = visible
        limit = request.get("max_output_tokens")
        if outcome == "incomplete":
            allowed = visible // 2
        elif isinstance(limit, int) and reasoning_tokens + visible > limit:
            reasoning_tokens = min(reasoning_tokens, max(0, limit))
            allowed = max(0, limit - reasoning_tokens)
        if outcome == "failed":
            self.status = "failed"
        elif outcome == "incomplete" or allowed < visible:
            self.status = "incomplete"
        else:
            self.status = "completed"
        self.incomplete_details = {"reason": "max_output_tokens"}
        self.error = {"code": "server_error", "message": SERVER_ERROR}

        self.items: list[_Item] = []
        if thinks:
            reasoning: JSON = {
                "id": self._item_id("rs_", len(self.items)),
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "".join(summary)}] if summary else [],
            }
            include = request.get("include")
            if isinstance(include, list) and ENCRYPTED_REASONING in include:
                sealed = hashlib.sha256(self.id.encode()).digest() * 3
                reasoning["encrypted_content"] = "gAAAAA" + base64.b64encode(sealed).decode()
            self.items.append(_Item(reasoning, summary))
        for position, function in enumerate(calls):
            left = allowed - position * CALL_TOKENS
            if left <= 0:
                break
            arguments = orjson.dumps(
                {"query": topic[:30], "unit": "celsius", "n": position}
            ).decode()
            whole = left >= CALL_TOKENS
            if not whole:
                arguments = arguments[: len(arguments) * left // CALL_TOKENS]
            call = {
                "id": self._item_id("fc_", len(self.items)),
                "type": "function_call",
                "status": "completed" if whole else "incomplete",
                "arguments": arguments,
                "call_id": f"call_{self.digest[position * 8 : position * 8 + 24]}",
                "name": function["name"],
            }
            self.items.append(_Item(call, split(arguments, 3)))
        kept = pieces[:allowed]
        if not calls and (kept or not pieces):
            message = {
                "id": self._item_id("msg_", len(self.items)),
                "type": "message",
                "status": "completed" if len(kept) == len(pieces) else "incomplete",
                "content": [self._text_part("".join(kept))],
                "role": "assistant",
            }
            self.items.append(_Item(message, kept))

        input_tokens = previous_tokens + max(
            1, len(orjson.dumps([request.get("instructions"), request.get("input")])) // 4
        )
        output_tokens = reasoning_tokens + min(allowed, visible)
        self.usage: JSON = {
            "input_tokens": input_tokens,
            "input_tokens_details": {
                "cached_tokens": (input_tokens // 64) * 64 if input_tokens >= 64 else 0,
                "cache_write_tokens": 0,
            },
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens,
        }

    def _item_id(self, prefix: str, index: int) -> str:
        """Like OpenAI's, an item's id ends as its response's id does."""
        return _new_id(self.id, f"out{index}")(prefix)

    @staticmethod
    def _text_part(text: str) -> JSON:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    @property
    def background(self) -> bool:
        return self.request.get("background") is True

    @property
    def stored(self) -> bool:
        return self.request.get("store") is not False

    def output(self) -> list[JSON]:
        return [item.final for item in self.items]

    def body(self, state: str | None = None) -> JSON:
        """The response object, as it is when its status is ``state`` (by default the one
        the fake model ends with)."""
        state = state or self.status
        request = self.request
        finished = state in ("completed", "incomplete")
        text = request.get("text")
        text = text if isinstance(text, dict) else {}
        tier = request.get("service_tier")
        tools = request.get("tools")
        body: JSON = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": state,
            "background": self.background,
            "completed_at": self.created_at + 1 if state == "completed" else None,
            "error": self.error if state == "failed" else None,
            "incomplete_details": self.incomplete_details if state == "incomplete" else None,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "max_tool_calls": request.get("max_tool_calls"),
            "model": self.model,
            "output": self.output() if finished else [],
            "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
            "previous_response_id": request.get("previous_response_id"),
            "prompt_cache_key": request.get("prompt_cache_key"),
            "prompt_cache_retention": request.get("prompt_cache_retention"),
            "reasoning": self.reasoning,
            "safety_identifier": request.get("safety_identifier"),
            "service_tier": "default" if tier in (None, "auto") else tier,
            "store": self.stored,
            "temperature": _given(request, "temperature", 1.0),
            "text": {
                "format": text.get("format") or {"type": "text"},
                "verbosity": text.get("verbosity") or "medium",
            },
            "tool_choice": _given(request, "tool_choice", "auto"),
            "tools": [_tool_echo(tool) for tool in tools] if isinstance(tools, list) else [],
            "top_logprobs": _given(request, "top_logprobs", 0),
            "top_p": _given(request, "top_p", 1.0),
            "truncation": _given(request, "truncation", "disabled"),
            "usage": self.usage if finished else None,
            "user": request.get("user"),
            "metadata": _given(request, "metadata", {}),
        }
        if request.get("prompt") is not None:
            body["prompt"] = request["prompt"]
        conversation = request.get("conversation")
        if conversation is not None:
            body["conversation"] = (
                {"id": conversation} if isinstance(conversation, str) else conversation
            )
        return body

    def events(self, broken: bool = False) -> Iterator[bytes]:
        """Each SSE event of the streamed answer, as OpenAI sends them: ``event: <type>``, then
        the data with that ``type`` and an increasing ``sequence_number``; no ``[DONE]``.
        A failed answer, or a ``broken`` stream, sends a few deltas and then its
        ``response.failed`` or ``error`` event, and nothing after."""
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return sse(kind, {"type": kind, "sequence_number": next(numbers), **fields})

        yield event("response.created", response=self.body("in_progress"))
        yield event("response.in_progress", response=self.body("in_progress"))
        troubled = broken or self.status == "failed"
        deltas = 0
        for index, item in enumerate(self.items):
            for kind, fields in self._item_events(index, item):
                yield event(kind, **fields)
                deltas += kind.endswith(".delta")
                if troubled and deltas >= DELTAS_BEFORE_TROUBLE:
                    break
            if troubled and deltas >= DELTAS_BEFORE_TROUBLE:
                break
        if broken:
            yield event("error", code="server_error", message=SERVER_ERROR, param=None)
            return
        terminal = {"failed": "response.failed", "incomplete": "response.incomplete"}
        yield event(terminal.get(self.status, "response.completed"), response=self.body())

    def _item_events(self, index: int, item: _Item) -> Iterator[tuple[str, JSON]]:
        """The type and fields of each event that streams one output item."""
        final = item.final
        at = {"item_id": final["id"], "output_index": index}
        if final["type"] == "reasoning":
            yield (
                "response.output_item.added",
                {"output_index": index, "item": {**final, "summary": []}},
            )
            if item.deltas:
                part = {"type": "summary_text", "text": "".join(item.deltas)}
                at = {**at, "summary_index": 0}
                yield "response.reasoning_summary_part.added", {**at, "part": {**part, "text": ""}}
                for delta in item.deltas:
                    yield "response.reasoning_summary_text.delta", {**at, "delta": delta}
                yield "response.reasoning_summary_text.done", {**at, "text": part["text"]}
                yield "response.reasoning_summary_part.done", {**at, "part": part}
        elif final["type"] == "message":
            added = {**final, "status": "in_progress", "content": []}
            yield "response.output_item.added", {"output_index": index, "item": added}
            part = final["content"][0]
            at = {**at, "content_index": 0}
            yield "response.content_part.added", {**at, "part": self._text_part("")}
            for delta in item.deltas:
                yield "response.output_text.delta", {**at, "delta": delta, "logprobs": []}
            yield "response.output_text.done", {**at, "text": part["text"], "logprobs": []}
            yield "response.content_part.done", {**at, "part": part}
        else:
            added = {**final, "status": "in_progress", "arguments": ""}
            yield "response.output_item.added", {"output_index": index, "item": added}
            for delta in item.deltas:
                yield "response.function_call_arguments.delta", {**at, "delta": delta}
            done = {"name": final["name"], "arguments": final["arguments"]}
            yield "response.function_call_arguments.done", {**at, **done}
        yield "response.output_item.done", {"output_index": index, "item": final}


def item_hash(response_id: str, where: str) -> str:
    return hashlib.sha256(f"{response_id}/{where}".encode()).hexdigest()[:32]


def _new_id(response_id: str, where: str) -> Callable[[str], str]:
    """The id an item without one gets, with the prefix of its kind."""
    return lambda prefix: prefix + item_hash(response_id, where) + response_id[-16:]


def _input_part(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    if part.get("type") == "input_text":
        return {"type": "input_text", "text": part.get("text", "")}
    if part.get("type") == "input_image":
        return {
            "type": "input_image",
            "detail": part.get("detail") or "auto",
            "file_id": part.get("file_id"),
            "image_url": part.get("image_url"),
        }
    return part


def _output_part(part: Any) -> Any:
    if not isinstance(part, dict) or part.get("type") not in ("output_text", "input_text"):
        return part
    return {
        "type": "output_text",
        "annotations": part.get("annotations") or [],
        "logprobs": part.get("logprobs") or [],
        "text": part.get("text", ""),
    }


def input_resource(item: JSON, new_id: Callable[[str], str]) -> JSON:
    """An input item as ``/input_items`` lists it: with an id, a status, and a message's
    content as a list of parts."""
    kind = _kind(item)
    if kind == "message":
        role = item.get("role", "user")
        content = item.get("content")
        if role == "assistant":
            parts = (
                [_output_part({"type": "output_text", "text": content})]
                if isinstance(content, str)
                else [_output_part(part) for part in content or []]
            )
        else:
            parts = (
                [{"type": "input_text", "text": content}]
                if isinstance(content, str)
                else [_input_part(part) for part in content or []]
            )
        return {
            "id": item.get("id") or new_id("msg_"),
            "type": "message",
            "status": item.get("status") or "completed",
            "role": role,
            "content": parts,
        }
    if kind == "function_call":
        return {
            "id": item.get("id") or new_id("fc_"),
            "type": "function_call",
            "status": item.get("status") or "completed",
            "arguments": item.get("arguments", ""),
            "call_id": item.get("call_id"),
            "name": item.get("name"),
        }
    if kind == "function_call_output":
        return {
            "id": item.get("id") or new_id("fco_"),
            "type": "function_call_output",
            "status": item.get("status") or "completed",
            "call_id": item.get("call_id"),
            "output": item.get("output", ""),
        }
    if kind == "reasoning":
        return {**item, "id": item.get("id") or new_id("rs_"), "summary": item.get("summary") or []}
    return {**item, "id": item.get("id") or new_id("item_")}


@dataclass
class _Record:
    answer: ResponseAnswer
    inputs: list[JSON]
    topic: str
    ready_at: float | None  # background responses: when the fake model is done
    cancelled: bool = False

    def state(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.ready_at is not None and time.monotonic() < self.ready_at:
            return "in_progress"
        return self.answer.status


class ResponseStore:
    """The responses the fake answered (the last ``capacity``), as OpenAI keeps them."""

    def __init__(self, capacity: int = HISTORY) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._owners: dict[str, str] = {}  # output item id -> id of its response
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._records)

    def create(
        self,
        request: JSON,
        *,
        chunks: int = DEFAULT_CHUNKS,
        outcome: str = "completed",
        broken: bool = False,
        delay: float = 0.0,
    ) -> ResponseAnswer | tuple[int, bytes]:
        """The answer to ``POST /v1/responses``, kept; or ``(status, error body)``."""
        if not isinstance(request.get("model"), str) or not request["model"]:
            return 400, missing("model")
        items = input_items(request.get("input"))
        if items is None:
            return 400, error(400, "Invalid type for 'input'.", "input", code="invalid_type")
        previous_id = request.get("previous_response_id")
        previous = self._records.get(previous_id) if isinstance(previous_id, str) else None
        if previous_id is not None and previous is None:
            return 400, error(
                400,
                f"Previous response with id '{previous_id}' not found.",
                "previous_response_id",
                code="previous_response_not_found",
            )
        resolved = []
        for item in items:
            if _kind(item) == "item_reference":
                found = self._item(item.get("id"))
                if found is None:
                    return 400, error(400, f"Item with id '{item.get('id')}' not found.", "input")
                item = found
            resolved.append(item)
        topic = last_user_text(resolved) or (previous.topic if previous else "")
        answer = ResponseAnswer(
            request,
            resolved,
            sequence=next(self._sequence),
            topic=topic,
            chunks=chunks,
            outcome=outcome if outcome in OUTCOMES else "completed",
            previous_tokens=previous.answer.usage["total_tokens"] if previous else 0,
        )
        streamed = request.get("stream") is True
        if broken and streamed:
            answer.status = "failed"
        if answer.stored:
            inputs = [
                input_resource(item, _new_id(answer.id, f"in{index}"))
                for index, item in enumerate(resolved)
            ]
            pending = answer.background and not streamed
            ready_at = time.monotonic() + delay * chunks if pending else None
            self._keep(_Record(answer, inputs, topic, ready_at))
        return answer

    def _keep(self, record: _Record) -> None:
        response_id = record.answer.id
        self._records[response_id] = record
        for item in record.answer.output():
            self._owners[item["id"]] = response_id
        while len(self._records) > self.capacity:
            _, gone = self._records.popitem(last=False)
            self._forget(gone)

    def _forget(self, record: _Record) -> None:
        for item in record.answer.output():
            if self._owners.get(item["id"]) == record.answer.id:
                del self._owners[item["id"]]

    def _item(self, item_id: Any) -> JSON | None:
        record = (
            self._records.get(self._owners.get(item_id, "")) if isinstance(item_id, str) else None
        )
        if record is None:
            return None
        return next((item for item in record.answer.output() if item["id"] == item_id), None)

    def resource(self, method: str, rest: str, query: bytes) -> tuple[int, bytes]:
        """``(status, body)`` of ``METHOD /v1/responses/<rest>``: retrieve, delete, cancel,
        or list the input items of a response."""
        response_id, _, action = rest.partition("/")
        routes: dict[tuple[str, str], Callable[[_Record], tuple[int, bytes]]] = {
            ("GET", ""): self._retrieve,
            ("DELETE", ""): self._delete,
            ("POST", "cancel"): self._cancel,
            ("GET", "input_items"): lambda record: self._input_items(record, query),
        }
        handler = routes.get((method, action))
        if handler is None or not response_id:
            return 404, error(404, f"Invalid URL ({method} /v1/responses/{rest})", code=None)
        record = self._records.get(response_id)
        if record is None:
            return 404, error(404, f"Response with id '{response_id}' not found.", code=None)
        return handler(record)

    def _retrieve(self, record: _Record) -> tuple[int, bytes]:
        return 200, orjson.dumps(record.answer.body(record.state()))

    def _delete(self, record: _Record) -> tuple[int, bytes]:
        response_id = record.answer.id
        del self._records[response_id]
        self._forget(record)
        return 200, orjson.dumps({"id": response_id, "object": "response.deleted", "deleted": True})

    def _cancel(self, record: _Record) -> tuple[int, bytes]:
        if not record.answer.background:
            return 400, error(400, "Cannot cancel a synchronous response.", code=None)
        if record.state() in PENDING:
            record.cancelled = True
        return 200, orjson.dumps(record.answer.body(record.state()))

    def _input_items(self, record: _Record, query: bytes) -> tuple[int, bytes]:
        params = parse_qs(query.decode("latin-1"))
        try:
            limit = int(params.get("limit", ["20"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return 400, error(400, "Invalid 'limit': it must be 1 to 100.", "limit")
        order = params.get("order", ["desc"])[0]
        if order not in ("asc", "desc"):
            return 400, error(400, "Invalid 'order': 'asc' or 'desc'.", "order")
        listed = record.inputs if order == "asc" else record.inputs[::-1]
        after = params.get("after", [None])[0]
        ids = [item["id"] for item in listed]
        start = ids.index(after) + 1 if after in ids else 0
        page = listed[start : start + limit]
        body = {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(listed),
        }
        return 200, orjson.dumps(body)
