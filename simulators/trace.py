"""What happened to each simulated device, as timestamped events (pure; time passed in).

Times are seconds since the start of the run (a monotonic clock read by the fleet runner),
so that latencies never jump with the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """How a device's agent ended (or where it was when the run ended)."""

    RUNNING = "running"  # still up when the run ended (the normal case)
    REVOKED = "revoked"  # stopped because the service or broker refused it as revoked
    REFUSED = "refused"  # stopped because it was refused for another reason
    NEEDS_TOKEN = "needs-token"  # no valid certificate and no token: re-bootstrap needed
    FAILED = "failed"  # crashed or gave up on an error
    STOPPED = "stopped"  # stopped by the scenario (a device switched off)


@dataclass
class DeviceTrace:
    """One device's timeline."""

    device_id: str
    started: float | None = None
    enrolled: float | None = None
    connects: list[float] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)
    renewed: list[float] = field(default_factory=list)
    # The last few failed renewal attempts: (t, why, delay before the next); what a device
    # whose certificate expired ran into.
    renew_retries: list[tuple[float, str, float]] = field(default_factory=list)
    sent: int = 0  # telemetry messages acknowledged by the broker (PUBACK)
    received: int = 0  # distinct telemetry messages the observer saw
    outcome: Outcome = Outcome.RUNNING
    reason: str | None = None  # failure reason slug, e.g. "token-used", "broker-refused"
    detail: str | None = None  # the error's sentence, for the JSON report
    ended: float | None = None

    @property
    def connected(self) -> bool:
        return len(self.connects) > len(self.disconnects)

    @property
    def enroll_latency(self) -> float | None:
        if self.started is None or self.enrolled is None:
            return None
        return self.enrolled - self.started

    @property
    def connect_latency(self) -> float | None:
        """From holding a certificate to the first accepted CONNECT."""
        if self.enrolled is None or not self.connects:
            return None
        return self.connects[0] - self.enrolled

    def first_disconnect_after(self, t: float) -> float | None:
        return next((d for d in self.disconnects if d >= t), None)

    def disconnects_between(self, start: float, end: float) -> int:
        return sum(1 for d in self.disconnects if start <= d <= end)


@dataclass
class Journal:
    """Every device's trace plus the operator actions the scenario took (revocations...)."""

    traces: dict[str, DeviceTrace] = field(default_factory=dict)
    revoked_at: dict[str, float] = field(default_factory=dict)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (t, what) for plots

    def trace(self, device_id: str) -> DeviceTrace:
        found = self.traces.get(device_id)
        if found is None:
            found = self.traces[device_id] = DeviceTrace(device_id)
        return found

    def mark(self, t: float, what: str) -> None:
        self.marks.append((t, what))

    def connected_count(self) -> int:
        return sum(1 for t in self.traces.values() if t.connected)

    def connected_curve(self, start: float, end: float, step: float) -> list[tuple[float, int]]:
        """How many devices were connected at each `step` from `start` to `end` (inclusive)."""
        if step <= 0:
            raise ValueError(f"step must be positive, got {step}")
        changes: list[tuple[float, int]] = []
        for trace in self.traces.values():
            changes.extend((c, 1) for c in trace.connects)
            changes.extend((d, -1) for d in trace.disconnects)
        changes.sort()
        curve: list[tuple[float, int]] = []
        level = 0
        i = 0
        n = round((end - start) / step)
        for k in range(n + 1):
            t = start + k * step
            while i < len(changes) and changes[i][0] <= t:
                level += changes[i][1]
                i += 1
            curve.append((round(t, 6), level))
        return curve
