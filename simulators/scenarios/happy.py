"""happy: every device enrolls, connects over mTLS and streams telemetry, undisturbed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from simulators.report import Check, Report
from simulators.scenarios.base import Scenario

if TYPE_CHECKING:
    from simulators.simulation import Simulation


class Happy(Scenario):
    name = "happy"
    summary = (
        "every device enrolls with its token, connects over mTLS and streams telemetry; "
        "no session drops, every device's telemetry reaches a backend subscriber"
    )

    async def run(self, sim: Simulation) -> Report:
        checks = [await sim.bring_up()]
        start = sim.seconds()
        await sim.hold(max(sim.options.duration, 2 * sim.options.telemetry_interval))
        end = sim.seconds()
        traces = sim.journal.traces.values()
        drops = sum(t.disconnects_between(start, end) for t in traces)
        checks.append(
            Check("no session dropped while streaming", drops == 0, f"{drops} disconnects")
        )
        silent = [t.device_id for t in traces if t.received == 0]
        checks.append(
            Check(
                "every device's telemetry reached the backend",
                not silent,
                "all devices heard" if not silent else f"{len(silent)} silent, e.g. {silent[0]}",
            )
        )
        return await sim.finish(checks)
