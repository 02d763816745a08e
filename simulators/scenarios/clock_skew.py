"""clock-skew: devices with wrong clocks enroll anyway, or wait for NTP instead of failing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from device_agent.agent import AgentState
from simulators.fleet import AgentSettings
from simulators.report import Check, Report
from simulators.scenarios.base import Scenario

if TYPE_CHECKING:
    from simulators.simulation import Simulation, SimulationOptions

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NTP_AFTER_S = 3.0

# Device clock groups, assigned round-robin: (name, offset from the true time or None for
# "booted in 1970 without a real-time clock").
GROUPS: list[tuple[str, timedelta | None]] = [
    ("on time", timedelta(0)),
    ("2 min slow", timedelta(minutes=-2)),  # within the certificates' 5-minute backdate
    ("10 min fast", timedelta(minutes=10)),
    ("booted in 1970", None),
]


@dataclass
class DeviceClock:
    """One device's wall clock: the true time plus an offset that NTP may later zero."""

    offset: timedelta = field(default_factory=timedelta)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


class ClockSkew(Scenario):
    name = "clock-skew"
    in_process_only = "gives agents clocks of their own and reads their state"
    summary = (
        "device clocks on time, 2 min slow, 10 min fast, and booted in 1970 (no RTC): the "
        "skewed ones enroll and connect normally (certificates are backdated), the 1970 ones "
        f"wait for a sane clock without enrolling, and enroll within seconds once NTP sets "
        f"it ({NTP_AFTER_S:.0f} s in)"
    )
    hosted_only = None

    def __init__(self) -> None:
        self.clocks: dict[str, DeviceClock] = {}
        self.group: dict[str, str] = {}

    def _clock_for(self, device_id: str) -> Callable[[], datetime]:
        return self.clocks.setdefault(device_id, DeviceClock()).now

    def agent_settings(self, options: SimulationOptions) -> AgentSettings:
        return AgentSettings(
            telemetry_interval=options.telemetry_interval,
            clock_for=self._clock_for,
            clock_poll=0.5,
        )

    async def run(self, sim: Simulation) -> Report:
        fleet = sim.local_fleet
        assert fleet is not None
        ids = fleet.ids
        for i, device_id in enumerate(ids):
            name, offset = GROUPS[i % len(GROUPS)]
            self.group[device_id] = name
            clock = self.clocks.setdefault(device_id, DeviceClock())
            clock.offset = offset if offset is not None else EPOCH - datetime.now(UTC)
        stale = [d for d in ids if self.group[d] == "booted in 1970"]
        sane = [d for d in ids if d not in stale]
        journal = sim.journal

        await fleet.start(ids, sim.options.ramp)
        await fleet.wait_until(
            lambda: all(fleet.settled(d) for d in sane), sim.options.up_timeout()
        )
        await sim.hold(max(0.0, NTP_AFTER_S - sim.seconds()))
        waiting = [d for d in stale if fleet.agents[d].state is AgentState.WAITING_FOR_CLOCK]
        enrolled_early = [d for d in stale if journal.trace(d).enrolled is not None]
        synced = sim.seconds()
        sim.journal.mark(synced, "NTP sets the 1970 clocks")
        for d in stale:
            self.clocks[d].offset = timedelta(0)
        await fleet.wait_until(
            lambda: all(journal.trace(d).connected for d in stale), 20.0 + len(stale) * 0.05
        )

        checks = []
        for name, _ in GROUPS[:3]:
            members = [d for d in sane if self.group[d] == name]
            if members:
                up = fleet.connected(members)
                checks.append(
                    Check(
                        f"clock {name}: enrolled and connected",
                        len(up) == len(members),
                        f"{len(up)}/{len(members)}",
                    )
                )
        if stale:
            checks.append(
                Check(
                    "clock in 1970: waits for a sane clock, does not enroll",
                    len(waiting) == len(stale) and not enrolled_early,
                    f"{len(waiting)}/{len(stale)} waiting-for-clock, "
                    f"{len(enrolled_early)} enrolled before NTP",
                )
            )
            delays = [
                (journal.trace(d).connects[-1] - synced)
                for d in stale
                if journal.trace(d).connected
            ]
            checks.append(
                Check(
                    "clock in 1970: enrolls and connects once NTP sets the clock",
                    len(delays) == len(stale),
                    f"{len(delays)}/{len(stale)}, slowest {max(delays, default=0):.1f} s "
                    "after the clock was set",
                )
            )
        return await sim.finish(checks, extra={"groups": self.group})
