"""OpenTelemetry export end to end: a gateway process whose ``OTEL_EXPORTER_OTLP_ENDPOINT``
is a local OTLP/HTTP receiver (protobuf, as Langfuse, Phoenix and the Collector take it)
exports one span per stored record, a caller's ``traceparent`` its parent; and a collector
that cannot be reached costs spans, counted, never a record."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.gateway_process import GatewayProcess, free_port, until
from tests.history_db import HistoryDB

pytestmark = pytest.mark.slow
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"


class Receiver:
    """Spans received, as (trace id, parent span id, name, attributes)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, dict[str, Any]]] = []
        self.services: set[str] = set()
        self.lock = threading.Lock()

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            for resource in request.resource_spans:
                for attribute in resource.resource.attributes:
                    if attribute.key == "service.name":
                        self.services.add(attribute.value.string_value)
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: _value(a.value) for a in span.attributes}
                        parent = span.parent_span_id.hex()
                        self.spans.append((span.trace_id.hex(), parent, span.name, attributes))


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind)


@contextmanager
def receiving() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            assert self.path == "/v1/traces", self.path
            receiver.take(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def counter(gateway: GatewayProcess, name: str) -> float:
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith(f"mes_{name}_total "):
            return float(line.split()[1])
    raise AssertionError(f"mes_{name}_total not in /metrics")


def test_every_stored_record_reaches_the_collector_as_one_span(
    upstream: Any, tmp_path: Path
) -> None:
    count = 1000
    with receiving() as (receiver, endpoint):
        env = {
            "UPSTREAM_BASE_URL": upstream.base_url,
            "SQL_DSN": str(tmp_path / "history.db"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_SERVICE_NAME": "gateway-under-test",
        }
        with (
            GatewayProcess(env, tmp_path / "gw") as gateway,
            httpx.Client(base_url=gateway.base_url, timeout=30) as client,
        ):
            for n in range(count):
                headers = {"traceparent": f"00-{TRACE}-{CALLER}-01"} if n == 0 else {}
                body = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"question {n}"}],
                    "stream": n % 2 == 1,
                    **({"stream_options": {"include_usage": True}} if n % 2 else {}),
                }
                answered = client.post("/chat/completions", json=body, headers=headers)
                assert answered.status_code == 200, answered.text
            until(lambda: len(receiver.spans) >= count)
            assert counter(gateway, "otel_spans_exported") == count
            assert counter(gateway, "otel_spans_dropped") == 0
            assert counter(gateway, "records_written") == count
    assert len(receiver.spans) == count
    assert receiver.services == {"gateway-under-test"}
    ids = {attributes["mes.completion_id"] for _, _, _, attributes in receiver.spans}
    assert len(ids) == count  # one span a record
    children = [s for s in receiver.spans if s[0] == TRACE]
    assert len(children) == 1 and children[0][1] == CALLER
    name, attributes = children[0][2], children[0][3]
    assert name == "chat gpt-4o-mini"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert "gen_ai.input.messages" not in attributes
    streamed = [a for _, _, _, a in receiver.spans if a["gen_ai.request.stream"]]
    assert len(streamed) == count // 2
    assert all(a["gen_ai.usage.output_tokens"] > 0 for a in streamed)


async def test_a_collector_that_cannot_be_reached_costs_spans_never_records(
    upstream: Any, tmp_path: Path
) -> None:
    history = str(tmp_path / "history.db")
    env = {
        "UPSTREAM_BASE_URL": upstream.base_url,
        "SQL_DSN": history,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # no one there
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
    }
    with GatewayProcess(env, tmp_path / "gw") as gateway:
        for n in range(20):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{n}"}]}
            assert httpx.post(gateway.base_url + "/chat/completions", json=body).is_success
        db = HistoryDB(history)
        try:
            assert await db.wait_for("completions", 20) == 20
        finally:
            await db.close()
        until(lambda: counter(gateway, "otel_spans_dropped") == 20)
        assert counter(gateway, "otel_spans_exported") == 0
        assert counter(gateway, "records_written") == 20
