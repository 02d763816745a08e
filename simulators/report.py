"""The end-of-run report: counts, latency percentiles, message accounting, scenario checks.

`build_report` is pure (a Journal in, a Report out); `render` draws it as rich tables and
`as_json` gives the same numbers to scripts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from simulators.trace import Journal, Outcome


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank percentiles of a sample, in seconds (None when the sample is empty)."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    def as_json(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 1)

        return {
            "count": self.count,
            "p50_ms": ms(self.p50),
            "p95_ms": ms(self.p95),
            "p99_ms": ms(self.p99),
            "max_ms": ms(self.max),
        }


def percentiles(values: Iterable[float]) -> Percentiles:
    data = sorted(values)
    if not data:
        return Percentiles(0, None, None, None, None)

    def rank(p: float) -> float:
        return data[max(0, math.ceil(p / 100 * len(data)) - 1)]

    return Percentiles(len(data), rank(50), rank(95), rank(99), data[-1])


@dataclass(frozen=True, slots=True)
class Check:
    """One thing the scenario promises, and whether this run kept the promise."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Timeline:
    """Event times (seconds since the run began) for plots: each device's enrollment and first
    connection, every disconnection, and the scenario's marks (revocations, restarts)."""

    enrolled: list[float]
    connected: list[float]  # first connection of each device
    reconnected: list[float]  # every later connection
    disconnected: list[float]
    marks: list[tuple[float, str]]

    def as_json(self) -> dict[str, Any]:
        return {
            "enrolled": [round(t, 4) for t in self.enrolled],
            "connected": [round(t, 4) for t in self.connected],
            "reconnected": [round(t, 4) for t in self.reconnected],
            "disconnected": [round(t, 4) for t in self.disconnected],
            "marks": [{"t": round(t, 4), "what": what} for t, what in self.marks],
        }


def timeline_of(journal: Journal) -> Timeline:
    traces = journal.traces.values()
    return Timeline(
        enrolled=sorted(t.enrolled for t in traces if t.enrolled is not None),
        connected=sorted(t.connects[0] for t in traces if t.connects),
        reconnected=sorted(c for t in traces for c in t.connects[1:]),
        disconnected=sorted(d for t in traces for d in t.disconnects),
        marks=sorted(journal.marks),
    )


@dataclass
class Report:
    scenario: str
    devices: int
    duration: float
    enrolled: int
    connected: int  # connected when the run ended
    ever_connected: int
    renewals: int
    devices_renewed: int
    outcomes: dict[str, int]
    failed_by_reason: dict[str, int]
    enroll_latency: Percentiles
    connect_latency: Percentiles
    revocation_latency: Percentiles
    sent: int
    received: int
    lost: int
    checks: list[Check] = field(default_factory=list)
    curve: list[tuple[float, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    timeline: Timeline = field(default_factory=lambda: Timeline([], [], [], [], []))

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)


def build_report(
    journal: Journal,
    *,
    scenario: str,
    duration: float,
    checks: list[Check] | None = None,
    curve: list[tuple[float, int]] | None = None,
    extra: dict[str, Any] | None = None,
    connected: int | None = None,
) -> Report:
    traces = list(journal.traces.values())
    outcomes = Counter(t.outcome.value for t in traces)
    failed = Counter(
        t.reason or t.outcome.value
        for t in traces
        if t.outcome not in (Outcome.RUNNING, Outcome.STOPPED) or t.reason
    )
    revocation = [
        d - at
        for device_id, at in journal.revoked_at.items()
        if (d := journal.trace(device_id).first_disconnect_after(at)) is not None
    ]
    sent = sum(t.sent for t in traces)
    received = sum(t.received for t in traces)
    return Report(
        scenario=scenario,
        devices=len(traces),
        duration=duration,
        enrolled=sum(1 for t in traces if t.enrolled is not None),
        connected=sum(1 for t in traces if t.connected) if connected is None else connected,
        ever_connected=sum(1 for t in traces if t.connects),
        renewals=sum(len(t.renewed) for t in traces),
        devices_renewed=sum(1 for t in traces if t.renewed),
        outcomes=dict(sorted(outcomes.items())),
        failed_by_reason=dict(sorted(failed.items())),
        enroll_latency=percentiles(v for t in traces if (v := t.enroll_latency) is not None),
        connect_latency=percentiles(v for t in traces if (v := t.connect_latency) is not None),
        revocation_latency=percentiles(revocation),
        sent=sent,
        received=received,
        # Sent counts PUBACKed messages; one the observer never saw was lost by the broker.
        lost=sum(max(0, t.sent - t.received) for t in traces),
        checks=list(checks or []),
        curve=list(curve or []),
        extra=dict(extra or {}),
        timeline=timeline_of(journal),
    )


def as_json(report: Report) -> dict[str, Any]:
    return {
        "scenario": report.scenario,
        "ok": report.ok,
        "devices": report.devices,
        "duration_s": round(report.duration, 3),
        "enrolled": report.enrolled,
        "connected_at_end": report.connected,
        "ever_connected": report.ever_connected,
        "renewals": report.renewals,
        "devices_renewed": report.devices_renewed,
        "outcomes": report.outcomes,
        "failed_by_reason": report.failed_by_reason,
        "latency": {
            "enroll": report.enroll_latency.as_json(),
            "connect": report.connect_latency.as_json(),
            "revocation_to_disconnect": report.revocation_latency.as_json(),
        },
        "messages": {"sent": report.sent, "received": report.received, "lost": report.lost},
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in report.checks],
        "curve": [{"t": t, "connected": n} for t, n in report.curve],
        **({"extra": report.extra} if report.extra else {}),
        "timeline": report.timeline.as_json(),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f} ms"


def render(report: Report, console: Console) -> None:
    """The human report: fleet counts, latencies, messages, then the scenario's checks."""
    fleet = Table(
        title=f"scenario {report.scenario}: {report.devices:,} devices, {report.duration:.1f} s",
        title_justify="left",
    )
    fleet.add_column("devices")
    fleet.add_column("count", justify="right")
    fleet.add_row("enrolled", f"{report.enrolled:,}")
    fleet.add_row("ever connected", f"{report.ever_connected:,}")
    fleet.add_row("connected at the end", f"{report.connected:,}")
    fleet.add_row(
        "renewed (devices / renewals)", f"{report.devices_renewed:,} / {report.renewals:,}"
    )
    for reason, count in report.failed_by_reason.items():
        fleet.add_row(f"[red]failed: {reason}[/red]", f"{count:,}")
    console.print(fleet)

    lat = Table(title="latency", title_justify="left")
    for col in ("", "n", "p50", "p95", "p99", "max"):
        lat.add_column(col, justify="right" if col else "left")
    for name, p in (
        ("enroll (start -> certificate)", report.enroll_latency),
        ("connect (certificate -> CONNACK)", report.connect_latency),
        ("revocation -> disconnect", report.revocation_latency),
    ):
        if p.count:
            lat.add_row(name, f"{p.count:,}", _ms(p.p50), _ms(p.p95), _ms(p.p99), _ms(p.max))
    console.print(lat)

    msgs = Table(title="telemetry (QoS 1)", title_justify="left")
    for col in ("sent (PUBACKed)", "received by observer", "lost"):
        msgs.add_column(col, justify="right")
    msgs.add_row(f"{report.sent:,}", f"{report.received:,}", f"{report.lost:,}")
    console.print(msgs)

    if report.checks:
        checks = Table(title="checks", title_justify="left")
        checks.add_column("")
        checks.add_column("check")
        checks.add_column("detail")
        for c in report.checks:
            checks.add_row(
                "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]", c.name, c.detail
            )
        console.print(checks)
