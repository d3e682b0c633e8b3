"""Counters, gauges and histograms, rendered in Prometheus' text format at ``GET /metrics``."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Upper bounds of the request duration histogram's buckets, in seconds (a stream's duration
# is its whole length).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MOST_SERIES = 200  # label sets a histogram keeps apart; past them, "other"

_HELP = {
    "requests": "Proxied /v1 requests.",
    "requests_rejected": "Requests the gateway refused itself (bad key, JSON or size).",
    "records_captured": "Records accepted: appended to the durable spool.",
    "records_written": "Records written to the history database.",
    "records_queued": "Records added to the Redis stream (MES_QUEUE), for writers to write.",
    "records_replayed": "Records the writer found spooled when it started (after a restart).",
    "records_adopted": "Records taken over from the spool slot of a process that is gone.",
    "records_dead_lettered": "Records the database refused for good, kept in dead-letter.jsonl.",
    "records_failed": "Records the writer could not handle (a bug; logged with the reason).",
    "records_erased": "Records of erased users that arrived after the erasure: not written.",
    "records_dropped": "Records not accepted because the spool was full (should stay 0).",
    "write_retries": "Batch writes retried because the database was unavailable.",
    "otel_spans_exported": "OpenTelemetry spans of stored records sent to the collector.",
    "otel_spans_dropped": "OpenTelemetry spans lost: the export queue full, or the collector "
    "refusing or unreachable (the records are stored all the same).",
    "upstream_errors": "Requests the upstream could not answer (unreachable, timeout, reset).",
    "upstream_failovers": "Tries moved to a fallback upstream (unreachable, timeout, 429, 5xx).",
    "client_disconnects": "Streams the client left before the end.",
    "retention_completions_deleted": "Completions removed by MES_RETENTION_DAYS.",
    "retention_request_logs_deleted": "Request logs removed by MES_RETENTION_DAYS.",
    "retention_days_dropped": "Whole days of history dropped (MES_DAILY_PARTITION).",
    "retention_contents_dropped": "Messages whose content MES_CONTENT_RETENTION_DAYS dropped.",
    "maintenance_failures": "Maintenance runs (retention) that failed; retried next interval.",
    "archive_records": "Records written to MES_ARCHIVE_DIR before retention or a prune removed "
    "them (or their content).",
    "archive_failures": "Removals not done because their archive could not be written whole "
    "(disk full, permission denied); retried next round.",
}


class Histogram:
    """Counts of observations by bucket, for each set of labels (at most ``MOST_SERIES``)."""

    def __init__(self, name: str, about: str, labels: tuple[str, ...], buckets: tuple[float, ...]):
        self.name, self.about, self.labels, self.buckets = name, about, labels, buckets
        self.series: dict[tuple[str, ...], list[float]] = {}  # bucket counts, then sum

    def observe(self, key: tuple[str, ...], value: float) -> None:
        counts = self.series.get(key)
        if counts is None:
            if len(self.series) >= MOST_SERIES:
                key = ("other",) * len(self.labels)
            counts = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
        counts[bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def render(self, lines: list[str]) -> None:
        lines.append(f"# HELP {self.name} {self.about}")
        lines.append(f"# TYPE {self.name} histogram")
        for key, counts in sorted(self.series.items()):
            render_series(
                lines, self.name, dict(zip(self.labels, key, strict=True)), self.buckets, counts
            )


def render_series(
    lines: list[str],
    name: str,
    labels: Mapping[str, str],
    buckets: tuple[float, ...],
    counts: list[float],
) -> None:
    """One series of a histogram: ``counts`` by bucket (the last one past every bound),
    then their sum."""
    named = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    prefix = named + "," if named else ""
    total = 0.0
    for bound, count in zip((*buckets, "+Inf"), counts[:-1], strict=True):
        total += count
        lines.append(f'{name}_bucket{{{prefix}le="{bound}"}} {int(total)}')
    suffix = f"{{{named}}}" if named else ""
    lines.append(f"{name}_sum{suffix} {round(counts[-1], 6)!r}")
    lines.append(f"{name}_count{suffix} {int(total)}")


@dataclass
class Metrics:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_HELP, 0))
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)
    # counters kept by another process (the history writer's), added in when rendered
    shared: Callable[[], dict[str, int]] | None = None
    costs: dict[str, float] = field(default_factory=dict)  # dollars by model
    shared_costs: Callable[[], dict[str, float]] | None = None  # the writer process's
    requests_seconds: Histogram = field(
        default_factory=lambda: Histogram(
            "mes_request_duration_seconds",
            "Proxied /v1 requests, by route and status, from their start to their last byte.",
            ("route", "status"),
            REQUEST_BUCKETS,
        )
    )
    # Histograms another process keeps (the writer's batches), as series to render.
    shared_histograms: Callable[[list[str]], None] | None = None
    # Gauges with labels, rendered as they come: name -> (help, {labels -> value}).
    labelled: dict[str, Callable[[], tuple[str, dict[tuple[tuple[str, str], ...], float]]]] = field(
        default_factory=dict
    )

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def add_costs(self, costs: Mapping[str, float]) -> None:
        for model, usd in costs.items():
            self.costs[model] = self.costs.get(model, 0.0) + usd

    def observe_batch(self, seconds: float) -> None:
        """A writer in this process (tests' in-process writers) reports no batch times."""

    def render(self) -> str:
        lines = []
        shared = self.shared() if self.shared is not None else {}
        for name, value in self.counters.items():
            value += shared.get(name, 0)
            lines.append(f"# HELP mes_{name}_total {_HELP.get(name, name)}")
            lines.append(f"# TYPE mes_{name}_total counter")
            lines.append(f"mes_{name}_total {value}")
        costs = dict(self.costs)
        for model, usd in (self.shared_costs() if self.shared_costs is not None else {}).items():
            costs[model] = costs.get(model, 0.0) + usd
        lines.append("# HELP mes_cost_usd_total Dollars spent, by model, on the records written.")
        lines.append("# TYPE mes_cost_usd_total counter")
        for model, usd in sorted(costs.items()):
            lines.append(f'mes_cost_usd_total{{model="{_label(model)}"}} {round(usd, 12)!r}')
        for name, read in self.gauges.items():
            lines.append(f"# TYPE mes_{name} gauge")
            lines.append(f"mes_{name} {read()}")
        for name, labelled in self.labelled.items():
            about, values = labelled()
            lines.append(f"# HELP mes_{name} {about}")
            lines.append(f"# TYPE mes_{name} gauge")
            for labels, level in values.items():
                named = ",".join(f'{k}="{_label(v)}"' for k, v in labels)
                lines.append(f"mes_{name}{{{named}}} {level}")
        self.requests_seconds.render(lines)
        if self.shared_histograms is not None:
            self.shared_histograms(lines)
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslashes, quotes and newlines escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
