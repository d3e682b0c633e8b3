"""OpenTelemetry export: each stored record as one GenAI span (``capture/spans.py``,
``storage/telemetry.py``), through the SDK's in-memory exporter: the attributes of each
kind of call, content only when asked for, a caller's ``traceparent`` as the parent, and a
collector that fails or lags costing spans (counted), never a write."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from capture.chat import ChatExchange
from capture.completions import CompletionsExchange
from capture.embeddings import EmbeddingsExchange
from capture.exchange import Exchange, RequestLog
from capture.messages import MessagesExchange
from capture.responses import ResponsesExchange
from capture.rows import Record, RowSet
from storage import telemetry
from storage.telemetry import SpanExport

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"


class Counted:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def inc(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount


def record(kind: type[Exchange], request: dict[str, Any], body: Any, **fields: Any) -> Exchange:
    return kind(
        owner="ann",
        key_fingerprint="fp",
        client_ip=None,
        user_agent=None,
        conversation_header=None,
        request=request,
        stream=False,
        started_at=datetime(2026, 12, 3, 12, 0, 0),
        status=fields.pop("status", 200),
        response_body=orjson.dumps(body),
        latency_ms=250.0,
        upstream=None,
        **fields,
    )


CHAT = record(
    ChatExchange,
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
    },
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 20,
            "completion_tokens": 9,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    },
    traceparent=f"00-{TRACE}-{CALLER}-01",
)
RESPONSES = record(
    ResponsesExchange,
    {"model": "gpt-5", "input": "Say hi"},
    {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "gpt-5-2025",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6},
    },
)
MESSAGES = record(
    MessagesExchange,
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Hi"}],
    },
    {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 8, "output_tokens": 2},
    },
)
EMBEDDINGS = record(
    EmbeddingsExchange,
    {"model": "text-embedding-3-small", "input": ["a", "b"]},
    {
        "object": "list",
        "data": [],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    },
)
COMPLETIONS = record(
    CompletionsExchange,
    {"model": "gpt-3.5-turbo-instruct", "prompt": "hello", "n": 2},
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [
            {"index": 0, "text": " world", "finish_reason": "length", "logprobs": None},
            {"index": 1, "text": " there", "finish_reason": "stop", "logprobs": None},
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    },
)
REFUSED = record(
    ChatExchange,
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "again"}]},
    {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}},
    status=429,
)


def exported(
    records: list[Record], content: bool = False, providers: dict[str, str | None] | None = None
) -> tuple[list[Any], Counted]:
    memory = InMemorySpanExporter()
    counted = Counted()
    known = {"default": "openai"} if providers is None else providers
    export = SpanExport(counted, known, content, exporter=memory)
    export.add([(r, _priced(r.rows())) for r in records])
    export.close()
    return list(memory.get_finished_spans()), counted


def _priced(rows: RowSet) -> RowSet:
    if rows.completion is not None:
        rows.completion["cost_usd"] = 0.0125  # as the writer's prices set it
    return rows


def test_each_kind_of_call_is_a_genai_span_with_its_models_usage_and_finish() -> None:
    spans, counted = exported([CHAT, RESPONSES, MESSAGES, EMBEDDINGS, COMPLETIONS])
    assert counted.counts == {"otel_spans_exported": 5}
    by_model = {span.attributes["gen_ai.request.model"]: span for span in spans}
    chat = by_model["gpt-4o-mini"]
    assert chat.name == "chat gpt-4o-mini"
    assert dict(chat.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ("tool_calls",),
        "gen_ai.usage.input_tokens": 20,
        "gen_ai.usage.output_tokens": 9,
        "gen_ai.usage.cache_read.input_tokens": 4,
        "gen_ai.conversation.id": CHAT.rows().completion["conversation_id"],  # type: ignore[index]
        "gen_ai.request.stream": False,
        "http.response.status_code": 200,
        "mes.cost_usd": 0.0125,
        "mes.completion_id": CHAT.id,
        "mes.owner": "ann",
    }
    assert chat.end_time - chat.start_time == 250_000_000  # its latency
    assert chat.start_time == int(datetime(2026, 12, 3, 12, tzinfo=UTC).timestamp() * 1e9)
    assert chat.kind.name == "CLIENT"
    assert chat.resource.attributes["service.name"] == "mes-gateway"
    responses = by_model["gpt-5"]
    assert responses.attributes["gen_ai.operation.name"] == "chat"
    assert responses.attributes["gen_ai.response.id"] == "resp_1"
    assert responses.attributes["gen_ai.usage.output_tokens"] == 1
    claude = by_model["claude-sonnet-4-5"]
    assert claude.attributes["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert claude.attributes["gen_ai.usage.input_tokens"] == 8
    embeddings = by_model["text-embedding-3-small"]
    assert embeddings.name == "embeddings text-embedding-3-small"
    assert embeddings.attributes["gen_ai.usage.input_tokens"] == 2
    legacy = by_model["gpt-3.5-turbo-instruct"]
    assert legacy.attributes["gen_ai.operation.name"] == "text_completion"
    assert legacy.attributes["gen_ai.response.finish_reasons"] == ("length", "stop")
    for span in spans:
        assert "gen_ai.input.messages" not in span.attributes  # no content unless asked


def test_the_provider_is_the_upstreams_and_an_anthropic_call_without_one_is_anthropics() -> None:
    spans, _ = exported([MESSAGES, CHAT], providers={})
    named = {
        s.attributes["gen_ai.request.model"]: s.attributes["gen_ai.provider.name"] for s in spans
    }
    assert named == {"claude-sonnet-4-5": "anthropic", "gpt-4o-mini": "openai"}
    spans, _ = exported([CHAT], providers={"default": "groq"})
    assert spans[0].attributes["gen_ai.provider.name"] == "groq"


def test_content_goes_in_only_when_asked_for_as_roles_and_parts() -> None:
    (span,), _ = exported([CHAT], content=True)
    assert orjson.loads(span.attributes["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]},
    ]
    assert orjson.loads(span.attributes["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [
                {
                    "type": "tool_call",
                    "id": "call_1",
                    "name": "weather",
                    "arguments": '{"city":"Paris"}',
                }
            ],
        }
    ]


def test_a_callers_traceparent_makes_the_span_its_child() -> None:
    spans, _ = exported([CHAT, RESPONSES])
    child = next(s for s in spans if s.attributes["gen_ai.request.model"] == "gpt-4o-mini")
    assert f"{child.context.trace_id:032x}" == TRACE
    assert child.parent is not None and f"{child.parent.span_id:016x}" == CALLER
    alone = next(s for s in spans if s.attributes["gen_ai.request.model"] == "gpt-5")
    assert alone.parent is None and f"{alone.context.trace_id:032x}" != TRACE


def test_an_error_answer_is_a_span_in_error() -> None:
    (span,), _ = exported([REFUSED])
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "rate_limit_exceeded"
    assert span.attributes["http.response.status_code"] == 429


class Refusing(InMemorySpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.FAILURE


class Stuck(InMemorySpanExporter):
    """A collector that does not answer until told to."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self.release.wait(30)
        return super().export(spans)


def test_a_refusing_collector_costs_the_spans_counted() -> None:
    counted = Counted()
    export = SpanExport(counted, {}, False, exporter=Refusing())
    export.add([(CHAT, CHAT.rows()), (RESPONSES, RESPONSES.rows())])
    export.close()
    assert counted.counts == {"otel_spans_dropped": 2}


def test_a_stuck_collector_never_holds_the_writer_the_queue_drops_what_does_not_fit() -> None:
    counted = Counted()
    stuck = Stuck()
    export = SpanExport(counted, {}, False, exporter=stuck, queue_spans=10)
    rows = CHAT.rows()
    done = threading.Event()

    def add() -> None:  # the writer's side: returns at once, whatever the collector does
        for _ in range(50):
            export.add([(CHAT, rows)])
        done.set()

    threading.Thread(target=add).start()
    assert done.wait(10), "add() waited on the collector"
    stuck.release.set()
    export.close()
    sent = len(stuck.get_finished_spans())
    assert counted.counts["otel_spans_exported"] == sent
    assert counted.counts["otel_spans_dropped"] == 50 - sent > 0


def test_a_request_that_is_not_a_call_has_no_span() -> None:
    log = RequestLog(
        owner="ann",
        key_fingerprint=None,
        method="GET",
        path="/v1/models",
        client_ip=None,
        user_agent=None,
        started_at=datetime(2026, 12, 3, 12),
        status=200,
    )
    spans, counted = exported([log, CHAT])
    assert [s.attributes["mes.completion_id"] for s in spans] == [CHAT.id]
    assert counted.counts == {"otel_spans_exported": 1}


def test_an_export_that_cannot_start_leaves_the_writer_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records are stored all the same: the writer gets no export, and says why."""

    def broken(*args: Any) -> SpanExport:
        raise ValueError("OTEL_EXPORTER_OTLP_HEADERS: not key=value pairs")

    monkeypatch.setattr(telemetry, "SpanExport", broken)
    assert telemetry.span_export(Counted(), {}, False) is None
