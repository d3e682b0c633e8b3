"""What the proxy needs to know of a captured API: how to read its request, what the gateway
adds to it upstream and takes out of the answer again, and the record it makes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from capture.exchange import Exchange

JSON = dict[str, Any]


class InvalidBody(ValueError):
    """The request body is not one the API takes: the gateway answers 400, sends nothing
    upstream and records nothing."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _unchanged(request: JSON, body: bytes) -> tuple[bytes, bool]:
    return body, False


def _as_sent(events: list[bytes], whole: bytes) -> bytes:
    return whole


def _whole(status: int, body: bytes) -> bytes:
    return body


def is_done(event: bytes) -> bool:
    """OpenAI's ``data: [DONE]``: a chat or legacy completion stream's last event."""
    return event.startswith(b"data: [DONE]")


@dataclass(frozen=True, slots=True)
class Api:
    """One captured API. ``parse`` reads the request (or raises ``InvalidBody``);
    ``upstream_body`` gives the body to send and whether the gateway added something for its
    own needs, in which case each batch of a stream's SSE events goes through
    ``client_events`` to take it out again. ``kept_answer`` gives the part of a whole
    answer the record keeps (by its status and body), on the request path: it must be
    cheap. ``last_event`` tells a stream's closing event, which waits until the record is
    spooled: a client that has the whole answer has it recorded."""

    record: type[Exchange]
    parse: Callable[[bytes], JSON]
    upstream_body: Callable[[JSON, bytes], tuple[bytes, bool]] = _unchanged
    client_events: Callable[[list[bytes], bytes], bytes] = _as_sent
    kept_answer: Callable[[int, bytes], bytes] = _whole
    last_event: Callable[[bytes], bool] = is_done

    @property
    def kind(self) -> str:
        return self.record.kind
