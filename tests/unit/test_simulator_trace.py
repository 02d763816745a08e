"""The simulator's TraceRecorder: what a device's timeline keeps of its agent's events."""

from __future__ import annotations

from device_agent.events import AgentEvent
from simulators.fleet import RENEW_RETRIES_KEPT, TraceRecorder
from simulators.trace import DeviceTrace


def test_failed_renewals_are_kept_for_the_stuck_report() -> None:
    """The soak's stuck_detail shows why a device's certificate expired: its last failed
    renewal attempts (time, why, delay), a bounded few; other retries are not renewals."""
    trace = DeviceTrace("dev-1")
    clock = iter(range(100))
    record = TraceRecorder(trace, lambda: float(next(clock)))
    record(AgentEvent.retry("mqtt", "broker down", 1.0))
    for n in range(RENEW_RETRIES_KEPT + 2):
        record(AgentEvent.retry("renew", f"no answer {n}", 0.5 * n))
    assert len(trace.renew_retries) == RENEW_RETRIES_KEPT
    assert trace.renew_retries[-1] == (6.0, f"no answer {RENEW_RETRIES_KEPT + 1}", 3.0)
    assert trace.renew_retries[0][1] == "no answer 2"
