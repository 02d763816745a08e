"""revoke: K devices revoked mid-run are dropped within a second; the rest never notice."""

from __future__ import annotations

from typing import TYPE_CHECKING

from device_agent.errors import DeviceRevoked, EstError
from device_agent.est_client import EstClient
from device_agent.est_wire import build_csr
from device_agent.keys import generate_key
from device_agent.keystore import Keystore
from simulators.report import Check, Report
from simulators.scenarios.base import Scenario
from simulators.trace import Outcome

if TYPE_CHECKING:
    from simulators.simulation import Simulation

DROP_LIMIT_S = 1.0


async def reenroll_refused(sim: Simulation, device_id: str) -> tuple[bool, str]:
    """Try simplereenroll (RFC 7030 4.2.2) with the revoked device's own certificate."""
    agent = sim.local_fleet.agents[device_id]
    ident = Keystore(agent.config.state_dir).load()
    if ident is None:
        return False, "no identity on disk"
    client = EstClient(agent.config.server, agent.config.trust_anchor, timeout=10)
    key = generate_key(agent.config.key_type)
    try:
        await client.simplereenroll(
            build_csr(key, agent.device_id), ident.cert_path, ident.key_path
        )
    except DeviceRevoked as exc:
        return True, f"HTTP {exc.status}: {exc.reason}"
    except EstError as exc:
        return False, str(exc)
    return False, "a new certificate was issued"


class Revoke(Scenario):
    name = "revoke"
    in_process_only = "re-enrolls with a revoked agent's own key"
    summary = (
        "K devices (--revoke) are revoked in the registry mid-run, as an operator would: each "
        "live session is dropped within 1 s, each reconnect is refused and the agent stops, "
        "re-enrollment is refused, and every other device stays connected"
    )

    async def run(self, sim: Simulation) -> Report:
        fleet = sim.local_fleet
        assert fleet is not None
        checks = [await sim.bring_up()]
        await sim.hold(max(1.0, sim.options.telemetry_interval))
        connected = fleet.connected()
        k = min(max(1, sim.options.revoke), max(1, len(connected) - 1), len(connected))
        victims = sorted(sim.rng.sample(connected, k)) if connected else []
        others = [d for d in connected if d not in victims]
        start = sim.seconds()
        for device_id in victims:
            sim.revoke(device_id)
        await fleet.wait_until(lambda: not any(fleet.running(d) for d in victims), 20.0)
        await sim.hold(max(1.0, sim.options.telemetry_interval))
        end = sim.seconds()

        journal = sim.journal
        latencies = {
            d: (drop - journal.revoked_at[d])
            for d in victims
            if (drop := journal.trace(d).first_disconnect_after(journal.revoked_at[d])) is not None
        }
        slow = {d: v for d, v in latencies.items() if v > DROP_LIMIT_S}
        worst = max(latencies.values(), default=float("nan"))
        checks.append(
            Check(
                f"each revoked session dropped within {DROP_LIMIT_S:.0f} s",
                bool(victims) and len(latencies) == len(victims) and not slow,
                f"{len(latencies)}/{len(victims)} dropped, slowest {worst * 1000:.0f} ms",
            )
        )
        refused = [
            d
            for d in victims
            if journal.trace(d).outcome in (Outcome.REVOKED, Outcome.REFUSED)
            and not any(c > journal.revoked_at[d] for c in journal.trace(d).connects)
        ]
        checks.append(
            Check(
                "each revoked device refused at reconnect, agent stopped",
                len(refused) == len(victims),
                f"{len(refused)}/{len(victims)} refused ("
                + ", ".join(sorted({journal.trace(d).reason or "?" for d in victims}))
                + ")",
            )
        )
        probes = [await reenroll_refused(sim, d) for d in victims[:3]]
        checks.append(
            Check(
                "re-enrollment with the revoked certificate refused",
                bool(probes) and all(ok for ok, _ in probes),
                probes[0][1] if probes else "no device revoked",
            )
        )
        disturbed = [d for d in others if journal.trace(d).disconnects_between(start, end)]
        still = len(fleet.connected(others))
        checks.append(
            Check(
                "every other device undisturbed",
                not disturbed and still == len(others),
                f"{still:,}/{len(others):,} still connected, {len(disturbed)} dropped",
            )
        )
        return await sim.finish(checks, extra={"revoked": victims})
