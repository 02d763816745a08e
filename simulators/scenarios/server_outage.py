"""server-outage: the EST service goes down; sessions stay up, enrollments and renewals wait."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from simulators.report import Check, Report, percentiles
from simulators.scenarios.base import Scenario

if TYPE_CHECKING:
    from simulators.simulation import Simulation, SimulationOptions

MIN_OUTAGE_S = 3.0
EXPIRY_MARGIN_S = 3.0  # the service comes back this long before the first certificate expires


class ServerOutage(Scenario):
    name = "server-outage"
    in_process_only = "reads the agents' certificates to time the outage"
    summary = (
        "half the fleet is up when the EST service stops; the other half boots during the "
        "outage, and the first half's renewals fall due in it: MQTT sessions are undisturbed, "
        "nothing is enrolled while it is down, agents back off, and once it is back every "
        "waiting device enrolls and every due renewal succeeds before its certificate expires"
    )
    hosted_only = "stops and restarts the EST service"

    def validity(self, options: SimulationOptions) -> timedelta:
        # Renewal falls due at 2/3 (+ up to 1/12) of the lifetime: the outage must cover every
        # first-half device's due time and end before the first of their expiries.
        return timedelta(seconds=10 + options.devices * 0.02)

    def backdate(self, options: SimulationOptions) -> timedelta:
        return timedelta(seconds=1)

    async def run(self, sim: Simulation) -> Report:
        fleet, stack = sim.local_fleet, sim.stack
        assert fleet is not None and stack is not None
        ids = fleet.ids
        first, late = ids[: max(1, len(ids) // 2)], ids[max(1, len(ids) // 2) :]
        journal = sim.journal
        checks = [await sim.bring_up(first)]

        down_at = sim.seconds()
        journal.mark(down_at, "EST down")
        await stack.stop_est()
        await fleet.start(late, sim.options.ramp)
        idents = [fleet.agents[d].identity for d in first]
        dues = [i.next_renewal for i in idents if i is not None]
        expiries = [i.not_after for i in idents if i is not None]
        now = datetime.now(UTC)
        until = now + timedelta(seconds=MIN_OUTAGE_S)
        if dues and expiries:
            cover = max(dues) + timedelta(seconds=1)
            limit = min(expiries) - timedelta(seconds=EXPIRY_MARGIN_S)
            until = max(until, min(cover, limit))
        await asyncio.sleep((until - now).total_seconds())
        enrolled_in_outage = [d for d in late if journal.trace(d).enrolled is not None]
        renewed_in_outage = [d for d in first if journal.trace(d).renewed]
        up_at = sim.seconds()
        due_in_outage = [
            d
            for d, i in zip(first, idents, strict=True)
            if i is not None and i.next_renewal < datetime.now(UTC)
        ]
        await stack.start_est()
        journal.mark(up_at, "EST back")

        def recovered() -> bool:
            return all(journal.trace(d).connected for d in late) and all(
                journal.trace(d).renewed for d in due_in_outage
            )

        await fleet.wait_until(recovered, 60.0 + len(ids) * 0.05)
        await sim.hold(0.5)
        end = sim.seconds()

        dropped = [d for d in first if journal.trace(d).disconnects_between(down_at, up_at)]
        checks.append(
            Check(
                "MQTT sessions undisturbed by the EST outage",
                not dropped,
                f"{len(first) - len(dropped)}/{len(first)} stayed connected for "
                f"{up_at - down_at:.1f} s",
            )
        )
        checks.append(
            Check(
                "nothing enrolled or renewed while the service was down",
                not enrolled_in_outage and not renewed_in_outage,
                f"{len(enrolled_in_outage)} enrollments, {len(renewed_in_outage)} renewals",
            )
        )
        waits = [t.connects[0] - up_at for d in late if (t := journal.trace(d)).connects]
        if late:
            p = percentiles(waits)
            checks.append(
                Check(
                    "devices booted during the outage enrolled once it was back",
                    len(waits) == len(late),
                    f"{len(waits)}/{len(late)} connected, p50 {(p.p50 or 0):.1f} s, max "
                    f"{(p.max or 0):.1f} s after the service returned (their backoff)",
                )
            )
        renewed_after = [
            d
            for d in due_in_outage
            if journal.trace(d).renewed and journal.trace(d).renewed[0] >= up_at
        ]
        checks.append(
            Check(
                "renewals due during the outage retried and succeeded after it",
                bool(due_in_outage) and len(renewed_after) == len(due_in_outage),
                f"{len(renewed_after)}/{len(due_in_outage)} renewed, none expired",
            )
        )
        still = fleet.connected(ids)
        checks.append(
            Check(
                "none lost",
                len(still) == len(ids),
                f"{len(still)}/{len(ids)} connected at {end:.1f} s",
            )
        )
        return await sim.finish(
            checks,
            extra={"outage_s": round(up_at - down_at, 3), "due_in_outage": len(due_in_outage)},
        )
