"""Hostile input, fuzzed for a bounded time: the SSE parser, the request parser, the stream
accumulator and the record builder never raise what they do not mean to, and fuzzed HTTP
requests never get a 5xx that is the gateway's own fault."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capture.accumulate import StreamAccumulator
from capture.api import InvalidBody
from capture.chat import ChatExchange, parse_request
from capture.codec import from_entry, to_entry
from capture.sse import EventSplitter, iter_data
from tests.gateway_process import GatewayProcess
from tests.history_db import HistoryDB

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)  # what orjson parses: no NaN, no inf
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
sse_bytes = st.lists(
    st.sampled_from([b"data: ", b"\n", b"\r\n", b"\r", b"[DONE]", b":", b"event: x", b"{", b"}"])
    | st.binary(max_size=12),
    max_size=30,
)


@FUZZ
@given(pieces=sse_bytes, cuts=st.lists(st.integers(0, 400), max_size=6))
def test_the_sse_splitter_loses_no_byte_however_the_stream_is_cut(
    pieces: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pieces)
    splitter = EventSplitter()
    out: list[bytes] = []
    start = 0
    for cut in sorted({min(c, len(stream)) for c in cuts}) + [len(stream)]:
        out.extend(splitter.feed(stream[start:cut]))
        start = cut
    assert b"".join(out) + splitter.rest() == stream
    list(iter_data(out))  # and what it split, it can read


@FUZZ
@given(body=st.binary(max_size=200) | json_values.map(orjson.dumps))
def test_the_request_parser_answers_a_request_or_a_clear_error(body: bytes) -> None:
    try:
        request = parse_request(body)
    except InvalidBody as error:
        assert error.message
        return
    assert isinstance(request, dict) and isinstance(request["messages"], list)


@FUZZ
@given(chunks=st.lists(json_values, max_size=8))
def test_the_stream_accumulator_takes_any_chunk(chunks: list[Any]) -> None:
    accumulator = StreamAccumulator()
    for chunk in chunks:
        if isinstance(chunk, dict):
            accumulator.add(chunk)
    accumulator.choices()


@FUZZ
@given(
    request=st.dictionaries(
        st.sampled_from(["model", "messages", "user", "metadata", "n"]), json_values, max_size=5
    ),
    body=st.binary(max_size=100) | json_values.map(orjson.dumps),
    events=sse_bytes,
    stream=st.booleans(),
    status=st.sampled_from([200, 400, 429, 500]),
)
def test_any_exchange_becomes_rows_and_survives_the_spool(
    request: dict[str, Any], body: bytes, events: list[bytes], stream: bool, status: int
) -> None:
    """Whatever came in and back, the writer can shape a record of it: it never ends up a
    dead letter for a bug of ours; and the same rows come out of it after the spool."""
    record = ChatExchange(
        owner="o",
        key_fingerprint=None,
        client_ip=None,
        user_agent=None,
        conversation_header=None,
        request=request,
        stream=stream,
        started_at=datetime.now(UTC).replace(tzinfo=None),
        status=status,
        response_body=body,
        chunks=[(1.0, b"".join(events))],
    )
    again = from_entry(to_entry(record))
    assert isinstance(again, ChatExchange) and again.rows() == record.rows()
    # Read back from the spool, a record the writer takes for free of NUL is.
    rows = again.rows()
    if rows.nul_free:
        written = [rows.completion, rows.conversation, *rows.messages]
        assert not any(
            "\x00" in value
            for row in written
            if row
            for value in row.values()
            if isinstance(value, str)
        )


def test_fuzzed_http_requests_never_get_a_5xx_of_the_gateways_own(
    upstream: Any, tmp_path: Path
) -> None:
    with GatewayProcess(
        {"UPSTREAM_BASE_URL": upstream.base_url, "GATEWAY_MAX_BODY_BYTES": "65536"}, tmp_path
    ) as gateway:
        client = httpx.Client(base_url=gateway.url, timeout=30)

        @FUZZ
        @given(
            method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
            path=st.sampled_from(
                [
                    "/v1/chat/completions",
                    "/v1/models",
                    "/v1/chat/completions/x/messages",
                    "/admin/users",
                    "/healthz",
                    "/v1/",
                    "/",
                ]
            )
            | st.text(min_size=1, max_size=20).map(lambda t: "/v1/" + t),
            body=st.binary(max_size=300)
            | json_values.map(orjson.dumps)
            | st.fixed_dictionaries(
                {"model": st.text(max_size=5), "messages": json_values, "stream": json_values}
            ).map(orjson.dumps),
            headers=st.dictionaries(
                st.sampled_from(
                    [
                        "authorization",
                        "x-conversation-id",
                        "content-type",
                        "x-forwarded-for",
                        "connection",
                        "te",
                        "api-key",
                    ]
                ),
                st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
                max_size=4,
            ),
        )
        def probe(method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
            try:
                response = client.request(method, path, content=body, headers=headers)
            except (httpx.InvalidURL, httpx.LocalProtocolError):
                return  # not a request httpx will send
            # 502 and 504 are the upstream's failures, passed on; any other 5xx is ours.
            assert response.status_code < 500 or response.status_code in (502, 504), (
                response.status_code,
                response.text[:300],
            )

        probe()
        assert client.get("/healthz").status_code == 200


async def test_thousands_of_messages_and_raw_header_tricks_are_handled(
    upstream: Any, tmp_path: Path
) -> None:
    messages = [{"role": "user" if n % 2 else "assistant", "content": f"m{n}"} for n in range(5000)]
    with GatewayProcess({"UPSTREAM_BASE_URL": upstream.base_url}, tmp_path) as gateway:
        reply = httpx.post(
            gateway.base_url + "/chat/completions",
            json={"model": "gpt-4o-mini", "messages": messages},
            headers={"X-Conversation-Id": "x" * 5000},
            timeout=60,
        )
        assert reply.status_code == 200
        raw_requests = [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Conversation-Id: a\nb\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad\x00Name: 1\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        ]
        for raw in raw_requests:
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
                sock.sendall(raw)
                status_line = sock.recv(4096).split(b"\r\n", 1)[0]
            assert not status_line.startswith(b"HTTP/1.1 5"), (raw, status_line)
        assert httpx.get(gateway.url + "/healthz").status_code == 200
        db = HistoryDB(str(tmp_path / "mes_gateway.db"))
        try:
            assert await db.wait_for("completions", 1) >= 1
            rows = [r for r in await db.completions() if r["request_message_count"] == 5000]
            (row,) = rows
            request, _ = await db.request_and_answer(row)
        finally:
            await db.close()
        assert request == messages
