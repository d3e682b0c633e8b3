"""OpenTelemetry export: one span per record the writer stored (``capture/spans.py``), sent
to an OTLP/HTTP collector (Langfuse, Phoenix, Jaeger, an OpenTelemetry Collector...).

Off the database's path: the writer hands each batch it committed to ``SpanExport.add``,
which builds the spans and puts them on a bounded queue, never waiting; a thread of its own
sends them in batches. A collector that is slow, down or refusing costs spans (counted:
``otel_spans_dropped``), never a database write or its timing. The OpenTelemetry packages
(the ``otel`` extra) are imported only when export is on; the exporter reads the standard
``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, timeout) and the resource
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from capture.rows import Record, RowSet
from capture.spans import Span, span_of
from storage.prices import upstream_provider

log = logging.getLogger("mes.telemetry")

QUEUE_SPANS = 8192  # spans waiting for the exporter; past that, dropped and counted
BATCH_SPANS = 512  # spans an export sends at most
EXPORT_SECONDS = 1.0  # the longest a span waits for a batch to fill
_STOP = object()


class SpanExport:
    """Spans of stored records, exported from a thread of its own."""

    def __init__(
        self,
        metrics: Any,
        providers: Mapping[str, str | None],
        content: bool,
        exporter: Any = None,
        queue_spans: int = QUEUE_SPANS,
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.propagators.textmap import DefaultGetter
        from opentelemetry.sdk import trace as sdk
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import SpanExportResult
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        self.metrics = metrics
        self.providers = dict(providers)
        self.content = content
        self.exporter = exporter
        self._queue: queue.Queue[Any] = queue.Queue(queue_spans)
        service = os.environ.get("OTEL_SERVICE_NAME") or "mes-gateway"
        self._resource = Resource.create({"service.name": service})
        self._scope = InstrumentationScope("mes-gateway")
        # The API's and the SDK's modules, imported here, once: the writer runs without
        # them unless export is on.
        self._trace, self._sdk, self._success = trace, sdk, SpanExportResult.SUCCESS
        self._propagator = TraceContextTextMapPropagator()
        self._getter = DefaultGetter()
        self._thread = threading.Thread(target=self._send, name="mes-otel-export", daemon=True)
        self._thread.start()

    def add(self, written: Sequence[tuple[Record, RowSet]]) -> None:
        """The spans of records just stored, queued for export; never waits."""
        for record, rows in written:
            try:
                completion = rows.completion or {}
                span = span_of(
                    rows,
                    upstream_provider(self.providers, completion),
                    self.content,
                    getattr(record, "traceparent", None),
                )
                if span is not None:
                    self._start(span)
            except Exception:  # a span is not worth a write: say so, go on
                log.exception("could not build the span of record %s", record.id)
                self.metrics.inc("otel_spans_dropped")

    def _start(self, span: Span) -> None:
        """The SDK's finished span, made as it is (a third of the CPU of starting and
        ending one through a tracer), then queued."""
        trace, sdk = self._trace, self._sdk
        parent = None
        if span.traceparent:
            carrier = {"traceparent": span.traceparent}
            found = trace.get_current_span(self._propagator.extract(carrier, getter=self._getter))
            if found.get_span_context().is_valid:
                parent = found.get_span_context()
        context = trace.SpanContext(
            parent.trace_id if parent else int.from_bytes(os.urandom(16), "big"),
            int.from_bytes(os.urandom(8), "big"),
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        status = trace.StatusCode.ERROR if span.error else trace.StatusCode.UNSET
        finished = sdk.ReadableSpan(
            span.name,
            context,
            parent,
            self._resource,
            span.attributes,
            [sdk.Event(name, timestamp=at) for name, at in span.events],
            (),
            trace.SpanKind.CLIENT,
            None,
            trace.Status(status, span.error),
            span.start_ns,
            span.end_ns,
            self._scope,
        )
        self._enqueue(finished)

    def _enqueue(self, span: Any) -> None:
        try:
            self._queue.put_nowait(span)
        except queue.Full:
            self.metrics.inc("otel_spans_dropped")

    def _send(self) -> None:
        stopping = False
        while not stopping:
            batch: list[Any] = []
            try:
                first = self._queue.get(timeout=EXPORT_SECONDS)
            except queue.Empty:
                continue
            for item in (first, *self._drain(BATCH_SPANS - 1)):
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                self._export(batch)

    def _drain(self, most: int) -> list[Any]:
        taken: list[Any] = []
        while len(taken) < most:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def _export(self, batch: list[Any]) -> None:
        try:
            result = self.exporter.export(batch)
        except Exception as error:
            log.warning("OpenTelemetry export failed: %s", error)
            result = None
        if result == self._success:
            self.metrics.inc("otel_spans_exported", len(batch))
        else:
            self.metrics.inc("otel_spans_dropped", len(batch))

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, for at most ``timeout`` seconds."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self.exporter.shutdown()


def span_export(
    metrics: Any, providers: Mapping[str, str | None], content: bool
) -> SpanExport | None:
    """The export a writer process runs, or None where it cannot (said once, at start:
    records are stored all the same): the OpenTelemetry packages are not installed, or the
    ``OTEL_*`` variables are not ones the exporter can use."""
    try:
        return SpanExport(metrics, providers, content)
    except ImportError as error:
        log.error(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s): "
            "pip install 'mes-gateway[otel]'; spans are not exported",
            error,
        )
    except Exception as error:  # a bad OTEL_* value: never a reason not to store records
        log.error("OpenTelemetry export cannot start (%s): spans are not exported", error)
    return None
