"""Prometheus text exposition (format 0.0.4) for a few counters and one latency histogram."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = _BUCKETS) -> None:
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{self.name}_sum {self.total:.6f}")
        lines.append(f"{self.name}_count {self.n}")
        return lines


class LabeledCounter:
    def __init__(self, name: str, help_text: str, label: str) -> None:
        self.name = name
        self.help = help_text
        self.label = label
        self.values: Counter[str] = Counter()

    def inc(self, label_value: str, amount: int = 1) -> None:
        self.values[label_value] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for value, count in sorted(self.values.items()):
            lines.append(f'{self.name}{{{self.label}="{value}"}} {count}')
        return lines


class Metrics:
    """The service's metrics; other parts (the broker) add their lines through `extra`."""

    def __init__(self) -> None:
        self.enrollments = LabeledCounter(
            "fleetpki_enrollments_total", "EST enrollments by operation and result.", "result"
        )
        self.latency = Histogram(
            "fleetpki_enroll_seconds", "Time to handle one EST enrollment request."
        )
        # A rise in "handshake" is typically devices presenting expired certificates or a
        # foreign CA's: they never reach the HTTP layer, so no other counter sees them.
        self.tls_failures = LabeledCounter(
            "fleetpki_est_tls_failures_total",
            "TLS handshakes on the EST port that did not complete, by reason.",
            "reason",
        )
        # False when the EST listener serves through asyncio's TLS transport because the fast
        # path's start-up self-check failed (transport/tls_socket.fast_path_unavailable).
        self.est_tls_fast_path = True
        self.extra: list[Callable[[], str]] = []

    def render(self) -> str:
        lines = self.enrollments.render() + self.latency.render() + self.tls_failures.render()
        lines += [
            "# HELP fleetpki_est_tls_fast_path 1 when the EST listener's TLS runs on the "
            "socket-bound fast path, 0 on asyncio's standard TLS transport.",
            "# TYPE fleetpki_est_tls_fast_path gauge",
            f"fleetpki_est_tls_fast_path {int(self.est_tls_fast_path)}",
        ]
        text = "\n".join(lines) + "\n"
        for source in self.extra:
            text += source()
        return text
