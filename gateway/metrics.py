"""Counters and gauges, rendered in Prometheus' text format at ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

_HELP = {
    "requests": "Proxied /v1 requests.",
    "requests_rejected": "Requests the gateway refused itself (bad key, JSON or size).",
    "records_captured": "Records handed to the capture queue.",
    "records_written": "Records written to the history database.",
    "records_failed": "Records the writer gave up on (logged with the reason).",
    "records_dropped": "Records not queued because the capture queue was full.",
    "upstream_errors": "Requests the upstream could not answer (unreachable, timeout, reset).",
    "client_disconnects": "Streams the client left before the end.",
}


@dataclass
class Metrics:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_HELP, 0))
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def render(self) -> str:
        lines = []
        for name, value in self.counters.items():
            lines.append(f"# HELP mes_{name}_total {_HELP.get(name, name)}")
            lines.append(f"# TYPE mes_{name}_total counter")
            lines.append(f"mes_{name}_total {value}")
        for name, read in self.gauges.items():
            lines.append(f"# TYPE mes_{name} gauge")
            lines.append(f"mes_{name} {read()}")
        return "\n".join(lines) + "\n"
