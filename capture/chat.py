"""OpenAI's chat completions (``POST /v1/chat/completions``): the request read, the usage the
gateway asks for on a client's behalf taken out of the stream again, and the record's rows:
the request's messages and the answer (whole, or rebuilt from its chunks) as a message
chain, the completion with its usage and timings, and its conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from capture import columns
from capture.accumulate import StreamAccumulator
from capture.answers import conversation_key, read_body
from capture.api import Api, InvalidBody
from capture.chain import ROOT, chain, content_text, continuation_key
from capture.exchange import Exchange
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
from capture.sse import event_data, iter_data

JSON = dict[str, Any]
TITLE_LENGTH = 80


def parse_request(body: bytes) -> JSON:
    request = parse_json_object(body)
    if not isinstance(request.get("messages"), list):
        raise InvalidBody("'messages' must be an array of messages.", param="messages")
    return request


def parse_json_object(body: bytes) -> JSON:
    """A request body that is a JSON object, with a boolean ``stream`` if any."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidBody(
            "We could not parse the JSON body of your request. "
            "The body must be a JSON object (see https://platform.openai.com/docs/api-reference)."
        ) from None
    if not isinstance(request, dict):
        raise InvalidBody("The request body must be a JSON object.")
    if "stream" in request and not isinstance(request["stream"], bool | None):
        raise InvalidBody("'stream' must be a boolean.", param="stream")
    if len(body) >= 2 * _NESTING:  # a shorter body cannot nest so deep
        try:
            orjson.dumps([request])  # as deep as the record nests it
        except orjson.JSONEncodeError:
            raise InvalidBody(
                f"The request is nested too deeply: at most {_NESTING} levels of arrays "
                "and objects."
            ) from None
    return request


# How deep the JSON of a record may nest: orjson writes no deeper, and a record that cannot
# be written would be lost. Writing a request to find out costs a sixth of parsing it
# (orjson, 1-200 KB); counting its brackets first cost more than that.
_NESTING = 250


def ask_for_usage(request: JSON, body: bytes) -> tuple[bytes, bool]:
    """The body to send upstream, and whether the gateway added ``include_usage`` to it."""
    if request.get("stream") is not True:
        return body, False
    options = request.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return body, False
    return orjson.dumps({**request, "stream_options": {**options, "include_usage": True}}), True


def without_usage_event(events: list[bytes], whole: bytes) -> bytes:
    """The events as the client would have had them had the gateway not asked for usage on
    its behalf: the usage-only chunk gone, and the ``"usage":null`` that asking adds to
    every other chunk. That field is a key of the chunk's top-level object, which a JSON
    string cannot hold unescaped, so it is cut from the bytes without parsing them."""
    kept = [event for event in events if not _is_usage_event(event)]
    out = whole if len(kept) == len(events) else b"".join(kept)
    if b'"usage":' in out:
        for added in _NULL_USAGE:
            out = out.replace(added, b"")
    return out


# How "usage": null appears in a chunk: last (OpenAI's order) or first, compact or spaced.
_NULL_USAGE = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')


def _is_usage_event(event: bytes) -> bool:
    if b'"usage"' not in event or b'"usage":null' in event or b'"usage": null' in event:
        return False
    data = event_data(event)
    if data is None or data == b"[DONE]":
        return False
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and bool(chunk.get("usage"))


@dataclass(slots=True)
class ChatExchange(Exchange):
    """One proxied chat completion."""

    kind = "chat"

    def rows(self) -> RowSet:
        answer = self._answer()
        messages, taken = self._request_messages()
        answered = [answer.choices[0][0]] if answer.choices else []
        linked = list(chain(messages))
        conversation_id = self._conversation_id(messages + answered, [d for d, _, _ in linked])
        params = {k: v for k, v in self.request.items() if k != taken}
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
        completion = self.completion_row(
            conversation_id,
            answer.error_type,
            answer.error_message,
            response_id=answer.id,
            response_model=short(answer.model, columns.NAME),
            params=orjson.dumps(params).decode(),
            metadata=json_or_none(self.request.get("metadata")),
            request_hash=request_hash,
            request_message_count=len(messages),
            response_hash=response_hash,
            extra_choices=orjson.dumps(extra_choices).decode() if extra_choices else None,
            finish_reason=answer.finish_reason,
            prompt_tokens=integer(usage.get("prompt_tokens")),
            completion_tokens=integer(usage.get("completion_tokens")),
            total_tokens=integer(usage.get("total_tokens")),
            cached_tokens=integer(dig(usage, "prompt_tokens_details", "cached_tokens")),
            reasoning_tokens=integer(dig(usage, "completion_tokens_details", "reasoning_tokens")),
            usage=json_or_none(answer.usage),
            ttft_ms=answer.ttft_ms,
            upstream_created=integer(answer.created),
            system_fingerprint=short(answer.system_fingerprint, columns.NAME),
        )
        conversation = self.conversation_row(
            conversation_id, title(messages), self.conversation_header
        )
        return RowSet(
            {COMPLETIONS: [completion], CONVERSATIONS: [conversation], MESSAGES: message_rows},
            resent=resent_count(messages),
            nul_free=self.nul_free,
        )

    def _request_messages(self) -> tuple[list[JSON], str | None]:
        """The request's messages, and the field they were taken from (which the stored
        parameters then leave out), or none where they are not a list of messages."""
        sent = self.request.get("messages")
        if isinstance(sent, list) and all(isinstance(m, dict) for m in sent):
            return sent, "messages"
        return [], None

    def _conversation_id(self, exchange: list[JSON], digests: list[str]) -> str:
        """Named by the client's header, else by the conversation's first exchange.

        Both are namespaced by owner: two callers naming the same conversation, or sending
        the same words, never share one. A first request and its answer start a
        conversation; a later request that resends them (see ``continuation_key``) lands
        in it, whichever process writes it and in whatever order. A request with no
        assistant message and no answer (an error, say) is a conversation of its own.
        """
        if self.conversation_header:
            return conversation_key(self.owner, self.conversation_header)
        key = continuation_key(exchange, digests)
        return self.id if key is None else conversation_key(self.owner, "thread", key)

    def _answer(self) -> Answer:
        if self.stream and self.chunks and 200 <= self.status < 300:
            return streamed_answer(self.chunks, self.cut_short)
        return json_answer(self.response_body, self.status, self.cut_short)


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


def _chat_choice(choice: JSON) -> JSON:
    return choice


def streamed_answer(
    chunks: list[tuple[float, bytes]],
    cut_short: str | None,
    delta_choice: Callable[[JSON], JSON] = _chat_choice,
) -> Answer:
    """The answer rebuilt from a stream's chunks; ``delta_choice`` gives a chunk's choice
    as chat's (a choice with a ``delta``)."""
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
            if not isinstance(chunk, dict):
                continue
            if delta_choice is not _chat_choice and isinstance(chunk.get("choices"), list):
                chunk["choices"] = [
                    delta_choice(c) for c in chunk["choices"] if isinstance(c, dict)
                ]
            if accumulator.add(chunk) and ttft_ms is None:
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


def _chat_message(choice: JSON) -> JSON | None:
    message = choice.get("message")
    return message if isinstance(message, dict) else None


def _has_error(answer: JSON) -> bool:
    return "error" in answer


def json_answer(
    body: bytes,
    status: int,
    cut_short: str | None,
    message_of: Callable[[JSON], JSON | None] = _chat_message,
) -> Answer:
    """The answer of a whole body; ``message_of`` gives a choice's message."""
    read = read_body(body, status, _has_error)
    parsed = read.parsed
    if parsed is None:
        return Answer(
            finish_reason=None if read.whole else cut_short,
            error_type=read.error_type,
            error_message=read.error_message,
        )
    choices = []
    for choice in parsed.get("choices") or ():
        if isinstance(choice, dict) and (message := message_of(choice)) is not None:
            choices.append((message, choice.get("finish_reason")))
    usage = parsed.get("usage")
    return Answer(
        id=text_or_none(parsed.get("id")),
        model=text_or_none(parsed.get("model")),
        created=parsed.get("created") if isinstance(parsed.get("created"), int) else None,
        system_fingerprint=text_or_none(parsed.get("system_fingerprint")),
        usage=usage if isinstance(usage, dict) else None,
        choices=choices,
        finish_reason=choices[0][1] if choices else cut_short,
    )


def is_assistant(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") == "assistant"


def resent_count(messages: list[Any], answers: Callable[[Any], bool] = is_assistant) -> int:
    """How many messages, from the first, end with the request's last one that ``answers``
    (an assistant's message; for the Responses API, any output item): history a client
    resends, which the turn that answered it stored."""
    for index in range(len(messages) - 1, -1, -1):
        if answers(messages[index]):
            return index + 1
    return 0


def title(messages: list[Any]) -> str | None:
    """The first words of the first user message that has any."""
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            text = content_text(message)
            if text and (words := first_words(text)):
                return words
    return None


def first_words(text: str) -> str:
    """``text`` with its whitespace collapsed, cut to ``TITLE_LENGTH``. A prompt may be
    200 KB: its head is looked at first, and all of it only when the head, collapsed,
    is too short to tell (the head's words are the first words of the whole). A title's
    worth of text with nothing to collapse (no whitespace but single spaces between words:
    ``isprintable`` is false for every other kind) is its own title, as most are."""
    start = text[: TITLE_LENGTH + 1]
    if start.isprintable() and "  " not in start and start[:1] != " " and start[-1:] != " ":
        return start if len(start) <= TITLE_LENGTH else start[: TITLE_LENGTH - 1] + "…"
    head = text[: 4 * TITLE_LENGTH]
    words = " ".join(head.split())
    if len(words) <= TITLE_LENGTH and len(head) < len(text):
        words = " ".join(text.split())
    return words if len(words) <= TITLE_LENGTH else words[: TITLE_LENGTH - 1] + "…"


API = Api(
    record=ChatExchange,
    parse=parse_request,
    upstream_body=ask_for_usage,
    client_events=without_usage_event,
)
