"""OpenAI's embeddings (``POST /v1/embeddings``): the model, each input's text as a user
message of a conversation of the call's own (search finds them; conversation lists show
them only when asked for embeddings), how many inputs there were, ``dimensions`` and
``encoding_format`` among the parameters, and the usage. Never the vectors: a thousand
inputs answer with megabytes of them, which would outweigh the rest of the history. They
are cut from the answer before it is spooled (``kept_answer``), on the request path, by
looking for where they end, not by parsing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from capture import columns
from capture.answers import read_body
from capture.api import Api
from capture.chain import chain
from capture.chat import first_words, parse_json_object
from capture.completions import prompt_messages
from capture.exchange import Exchange
from capture.message_rows import message_row
from capture.rows import (
    COMPLETIONS,
    CONVERSATIONS,
    MESSAGES,
    RowSet,
    integer,
    json_or_none,
    short,
)

JSON = dict[str, Any]
_SMALL = 4096  # an answer this short is kept whole


def kept_answer(status: int, body: bytes) -> bytes:
    """The answer without its vectors: ``"data"`` emptied, everything else as sent. The
    data is a list of objects, each ending in a vector (numbers or base64 text), so the
    first ``}]`` after ``"data"`` is where the list ends: one search in C, however long
    the vectors. What is kept must parse, or the whole answer is kept."""
    if not 200 <= status < 300 or len(body) <= _SMALL:
        return body
    start = body.find(b'"data"')
    end = body.find(b"}]", start) if start >= 0 else -1
    if end < 0:
        return body
    kept = body[:start] + b'"data":[]' + body[end + 2 :]
    try:
        orjson.loads(kept)
    except orjson.JSONDecodeError:
        return body
    return kept


@dataclass(slots=True)
class EmbeddingsExchange(Exchange):
    """One proxied embeddings call."""

    kind = "embeddings"

    def rows(self) -> RowSet:
        inputs = prompt_messages(self.request.get("input"))
        linked = list(chain(inputs))
        message_rows = [
            message_row(self.id, digest, parent, message, self.started_at)
            for digest, parent, message in linked
        ]
        taken = "input" if inputs else None
        params = {k: v for k, v in self.request.items() if k != taken}
        read = read_body(self.response_body, self.status, _has_error)
        answer = read.parsed or {}
        usage: JSON = answer["usage"] if isinstance(answer.get("usage"), dict) else {}
        completion = self.completion_row(
            self.id,  # a conversation of its own
            read.error_type,
            read.error_message,
            response_id=None,
            response_model=short(answer.get("model"), columns.NAME),
            params=orjson.dumps(params).decode(),
            metadata=None,
            request_hash=linked[-1][0] if linked else None,
            request_message_count=len(inputs),
            response_hash=None,
            extra_choices=None,
            finish_reason=None,
            prompt_tokens=integer(usage.get("prompt_tokens")),
            completion_tokens=0 if usage else None,
            total_tokens=integer(usage.get("total_tokens")),
            cached_tokens=None,
            reasoning_tokens=None,
            usage=json_or_none(usage or None),
            ttft_ms=None,
            upstream_created=None,
            system_fingerprint=None,
        )
        first = next((m["content"] for m in inputs if isinstance(m.get("content"), str)), None)
        conversation = self.conversation_row(self.id, first_words(first) if first else None)
        return RowSet(
            {COMPLETIONS: [completion], CONVERSATIONS: [conversation], MESSAGES: message_rows},
            nul_free=self.nul_free,
        )


def _has_error(answer: JSON) -> bool:
    return "error" in answer


API = Api(record=EmbeddingsExchange, parse=parse_json_object, kept_answer=kept_answer)
