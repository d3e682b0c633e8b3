"""OpenAI's legacy completions (``POST /v1/completions``), recorded as chat completions are:
the prompt as the request's user messages (a list of prompts, one message each), each
choice's text as an assistant's message, the finish reason and usage; for a stream, the
usage asked for on the client's behalf and taken out again, as for chat. A prompt of token
ids is kept as its length. Each call is a conversation of its own, unless the client names
one (``X-Conversation-Id``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from capture.answers import conversation_key
from capture.api import Api, InvalidBody
from capture.chat import (
    Answer,
    ChatExchange,
    ask_for_usage,
    json_answer,
    parse_json_object,
    streamed_answer,
    without_usage_event,
)

JSON = dict[str, Any]


def parse_request(body: bytes) -> JSON:
    request = parse_json_object(body)
    if "prompt" in request and not isinstance(request["prompt"], str | list | None):
        raise InvalidBody("'prompt' must be a string or an array.", param="prompt")
    return request


def prompt_messages(prompt: Any) -> list[JSON]:
    """A prompt as user messages: a string is one; a list of strings one each; token ids
    (a list of integers, or lists of them) are kept as how many there are."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        return []
    if prompt and all(isinstance(token, int) for token in prompt):
        return [{"role": "user", "content": None, "token_count": len(prompt)}]
    messages: list[JSON] = []
    for one in prompt:
        if isinstance(one, str):
            messages.append({"role": "user", "content": one})
        elif isinstance(one, list):
            messages.append({"role": "user", "content": None, "token_count": len(one)})
        else:
            messages.append({"role": "user", "content": one})
    return messages


def _text_message(choice: JSON) -> JSON | None:
    text = choice.get("text")
    return {"role": "assistant", "content": text} if isinstance(text, str) else None


def _text_delta(choice: JSON) -> JSON:
    """A streamed choice as chat's: its text fragment as a content delta."""
    delta = {"content": choice["text"]} if isinstance(choice.get("text"), str) else {}
    return {
        "index": choice.get("index"),
        "delta": delta,
        "finish_reason": choice.get("finish_reason"),
    }


@dataclass(slots=True)
class CompletionsExchange(ChatExchange):
    """One proxied legacy completion."""

    kind = "completions"

    def _request_messages(self) -> tuple[list[JSON], str | None]:
        prompt = self.request.get("prompt")
        if prompt is None or not isinstance(prompt, str | list):
            return [], None
        return prompt_messages(prompt), "prompt"

    def _conversation_id(self, exchange: list[JSON], digests: list[str]) -> str:
        if not self.conversation_header:
            return self.id
        return conversation_key(self.owner, self.conversation_header)

    def _answer(self) -> Answer:
        if self.stream and self.chunks and 200 <= self.status < 300:
            return streamed_answer(self.chunks, self.cut_short, _text_delta)
        return json_answer(self.response_body, self.status, self.cut_short, _text_message)


API = Api(
    record=CompletionsExchange,
    parse=parse_request,
    upstream_body=ask_for_usage,
    client_events=without_usage_event,
)
