"""The simulator's pure parts: percentiles, the connected curve, the report and failure slugs."""

from __future__ import annotations

import pytest

from device_agent.agent import AgentState
from simulators.fleet import failure_reason
from simulators.report import as_json, build_report, percentiles
from simulators.trace import Journal, Outcome


def test_percentiles_nearest_rank() -> None:
    p = percentiles([float(v) for v in range(1, 101)])
    assert (p.count, p.p50, p.p95, p.p99, p.max) == (100, 50.0, 95.0, 99.0, 100.0)
    one = percentiles([0.25])
    assert one.p50 == one.p99 == one.max == 0.25
    assert percentiles([]).p50 is None
    assert percentiles([0.0105]).as_json()["p50_ms"] == 10.5


def test_connected_curve_counts_live_sessions() -> None:
    journal = Journal()
    a, b = journal.trace("a"), journal.trace("b")
    a.connects, a.disconnects = [1.0, 3.0], [2.0]
    b.connects = [1.5]
    assert journal.connected_curve(0.0, 3.0, 0.5) == [
        (0.0, 0), (0.5, 0), (1.0, 1), (1.5, 2), (2.0, 1), (2.5, 1), (3.0, 2),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="step"):
        journal.connected_curve(0.0, 1.0, 0)


def test_report_counts_latencies_and_losses() -> None:
    journal = Journal()
    for i in range(4):
        t = journal.trace(f"d{i}")
        t.started, t.enrolled, t.connects = 0.0, 0.1 * (i + 1), [0.2 * (i + 1)]
        t.sent, t.received = 10, 10
    victim = journal.trace("d3")
    journal.revoked_at["d3"] = 5.0
    victim.disconnects = [5.25]
    victim.outcome, victim.reason = Outcome.REFUSED, "broker-refused"
    journal.trace("d2").received = 7  # three acknowledged messages never reached the backend
    report = build_report(journal, scenario="revoke", duration=6.0)
    assert (report.enrolled, report.connected, report.ever_connected) == (4, 3, 4)
    assert report.failed_by_reason == {"broker-refused": 1}
    assert report.revocation_latency.max == pytest.approx(0.25)
    assert report.enroll_latency.p50 == pytest.approx(0.2)
    assert (report.sent, report.received, report.lost) == (40, 37, 3)
    data = as_json(report)
    assert data["latency"]["revocation_to_disconnect"]["max_ms"] == 250.0
    assert data["messages"] == {"sent": 40, "received": 37, "lost": 3}
    assert data["ok"] is True  # no checks: nothing failed


@pytest.mark.parametrize(
    ("state", "error", "slug"),
    [
        (AgentState.REVOKED, "device revoked", "revoked"),
        (
            AgentState.REFUSED,
            "MQTT broker h:1 refused the device: not authorized",
            "broker-refused",
        ),
        (AgentState.REFUSED, "EST server refused (401): enrollment token used", "token-rejected"),
        (AgentState.REFUSED, "EST server refused (400) at x: CSR ...", "csr-rejected"),
        (AgentState.EXPIRED, "the certificate expired", "certificate-expired"),
        (AgentState.BROKEN, "agent.toml: bad", "config-or-state"),
    ],
)
def test_failure_reasons(state: AgentState, error: str, slug: str) -> None:
    assert failure_reason(state, error) == slug
