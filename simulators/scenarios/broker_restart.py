"""broker-restart: every device comes back by itself, spread out by backoff jitter."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from simulators.report import Check, Report, percentiles
from simulators.scenarios.base import Scenario

if TYPE_CHECKING:
    from simulators.simulation import Simulation

DOWN_S = 2.0
BIN_S = 0.1
HERD_SHARE = 0.35  # at most this share of the fleet may reconnect within one 100 ms bin


class BrokerRestart(Scenario):
    name = "broker-restart"
    summary = (
        f"the broker stops for {DOWN_S:.0f} s and comes back on the same port: every device "
        "reconnects by itself with backoff and jitter, no thundering herd (at most "
        f"{HERD_SHARE:.0%} of the fleet in any 100 ms); the report carries the reconnect curve"
    )
    hosted_only = "stops and restarts the broker"
    # Messages in flight to the observer die with the broker's in-memory sessions, and the
    # observer is away too while it is down: loss is reported, not failed on.
    delivery_check = False

    async def run(self, sim: Simulation) -> Report:
        fleet, stack = sim.fleet, sim.stack
        assert fleet is not None and stack is not None
        checks = [await sim.bring_up()]
        await sim.hold(1.0)
        ids = fleet.connected()
        stop_at = sim.seconds()
        sim.journal.mark(stop_at, "broker stopped")
        await stack.stop_broker()
        await sim.hold(DOWN_S)
        await stack.start_broker()
        back_at = sim.seconds()
        sim.journal.mark(back_at, "broker back")
        journal = sim.journal

        def reconnect(d: str) -> float | None:
            return next((c for c in journal.trace(d).connects if c >= back_at), None)

        await fleet.wait_until(
            lambda: all(reconnect(d) is not None for d in ids), 60.0 + len(ids) * 0.02
        )
        await sim.hold(1.0)
        end = sim.seconds()
        times = [t - back_at for d in ids if (t := reconnect(d)) is not None]
        dropped = [d for d in ids if journal.trace(d).first_disconnect_after(stop_at) is not None]
        checks.append(
            Check(
                "every session ended with the broker",
                len(dropped) == len(ids),
                f"{len(dropped)}/{len(ids)} disconnected",
            )
        )
        checks.append(
            Check(
                "every device reconnected by itself",
                len(times) == len(ids),
                f"{len(times)}/{len(ids)} back, the last {max(times, default=0):.1f} s after "
                "the broker",
            )
        )
        bins = Counter(math.floor(t / BIN_S) for t in times)
        peak = max(bins.values(), default=0)
        limit = max(2, math.ceil(HERD_SHARE * len(ids)))
        spread = percentiles(times)
        checks.append(
            Check(
                "no thundering herd",
                peak <= limit,
                f"at most {peak} reconnects in one 100 ms (limit {limit}); p50 "
                f"{(spread.p50 or 0):.2f} s, p95 {(spread.p95 or 0):.2f} s after the broker",
            )
        )
        curve = journal.connected_curve(max(0.0, stop_at - 1.0), end, BIN_S)
        return await sim.finish(
            checks,
            curve=curve,
            extra={
                "broker_down_s": round(back_at - stop_at, 3),
                "reconnect_after_broker_back": spread.as_json(),
                "peak_reconnects_per_100ms": peak,
            },
        )
