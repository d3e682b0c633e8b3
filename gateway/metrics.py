"""Counters and gauges, rendered in Prometheus' text format at ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_HELP = {
    "requests": "Proxied /v1 requests.",
    "requests_rejected": "Requests the gateway refused itself (bad key, JSON or size).",
    "records_captured": "Records accepted: appended to the durable spool.",
    "records_written": "Records written to the history database.",
    "records_replayed": "Records the writer found spooled when it started (after a restart).",
    "records_adopted": "Records taken over from the spool slot of a process that is gone.",
    "records_dead_lettered": "Records the database refused for good, kept in dead-letter.jsonl.",
    "records_failed": "Records the writer could not handle (a bug; logged with the reason).",
    "records_dropped": "Records not accepted because the spool was full (should stay 0).",
    "write_retries": "Batch writes retried because the database was unavailable.",
    "upstream_errors": "Requests the upstream could not answer (unreachable, timeout, reset).",
    "upstream_failovers": "Tries moved to a fallback upstream (unreachable, timeout, 429, 5xx).",
    "client_disconnects": "Streams the client left before the end.",
    "retention_completions_deleted": "Completions removed by MES_RETENTION_DAYS.",
    "retention_request_logs_deleted": "Request logs removed by MES_RETENTION_DAYS.",
    "retention_days_dropped": "Whole days of history dropped (MES_DAILY_PARTITION).",
    "retention_contents_dropped": "Messages whose content MES_CONTENT_RETENTION_DAYS dropped.",
    "maintenance_failures": "Maintenance runs (retention) that failed; retried next interval.",
}


@dataclass
class Metrics:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_HELP, 0))
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)
    # counters kept by another process (the history writer's), added in when rendered
    shared: Callable[[], dict[str, int]] | None = None
    costs: dict[str, float] = field(default_factory=dict)  # dollars by model
    shared_costs: Callable[[], dict[str, float]] | None = None  # the writer process's

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def add_costs(self, costs: Mapping[str, float]) -> None:
        for model, usd in costs.items():
            self.costs[model] = self.costs.get(model, 0.0) + usd

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
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslashes, quotes and newlines escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
