"""expired-cert: devices switched off past their certificate's end need a new token, not a loop."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import aiomqtt
from aiomqtt.client import ProtocolVersion

from device_agent.errors import EstError
from device_agent.est_client import EstClient
from device_agent.est_wire import build_csr
from device_agent.keys import generate_key
from device_agent.keystore import Identity, Keystore
from device_agent.tls import client_context
from enroll_server.home.config import load_config as load_server_config
from fleetpki.atomic_file import write_atomic
from fleetpki.identity import DeviceId
from simulators.report import Check, Report
from simulators.scenarios.base import Scenario
from simulators.trace import Outcome

if TYPE_CHECKING:
    from simulators.simulation import Simulation, SimulationOptions


async def broker_refuses(sim: Simulation, device_id: str, ident: Identity) -> tuple[bool, str]:
    """Connect to the broker with the expired certificate, as a device that ignores expiry."""
    assert sim.endpoints is not None and sim.layout is not None
    ctx = client_context(sim.layout.root_cert, ident.cert_path, ident.key_path)
    try:
        async with asyncio.timeout(10):
            async with aiomqtt.Client(
                sim.endpoints.host,
                sim.endpoints.mqtt_port,
                identifier=device_id,
                protocol=ProtocolVersion.V311,
                tls_context=ctx,
                timeout=3,
            ):
                return False, "the broker accepted an expired certificate"
    except (aiomqtt.MqttError, OSError, ssl.SSLError, TimeoutError) as exc:
        # With TLS 1.3 the client learns of the rejection only as a closed or silent link.
        return True, f"no session: {str(exc) or type(exc).__name__}"


async def renewal_refused(sim: Simulation, device_id: str, ident: Identity) -> tuple[bool, str]:
    """simplereenroll with the expired certificate (RFC 7030 3.3.2: mTLS must fail)."""
    cfg = sim.local_fleet.config_of(device_id)
    client = EstClient(cfg.server, cfg.trust_anchor, timeout=10)
    csr = build_csr(generate_key(cfg.key_type), cfg.device_id)
    try:
        await client.simplereenroll(csr, ident.cert_path, ident.key_path)
    except EstError as exc:
        return True, str(exc)
    return False, "the service renewed an expired certificate"


class ExpiredCert(Scenario):
    name = "expired-cert"
    in_process_only = "renews with an agent's expired certificate itself"
    summary = (
        "devices enroll, are switched off before renewal and back on after their certificate "
        "expired: each agent stops with 'needs a new token' instead of looping, the broker "
        "and the EST server refuse the expired certificate, and after the operator reissues "
        "tokens every device re-bootstraps and reconnects with a new certificate"
    )
    hosted_only = "needs certificates a few seconds long"

    def validity(self, options: SimulationOptions) -> timedelta:
        return timedelta(seconds=6 + options.devices * 0.01)

    def backdate(self, options: SimulationOptions) -> timedelta:
        return timedelta(seconds=1)

    async def run(self, sim: Simulation) -> Report:
        fleet, registry, layout = sim.local_fleet, sim.registry, sim.layout
        assert fleet is not None and registry is not None and layout is not None
        ids = fleet.ids
        journal = sim.journal
        # Switch each device off as soon as it is connected: well before 2/3 of its lifetime.
        await fleet.start(ids, sim.options.ramp)
        off: set[str] = set()

        def switch_off_connected() -> bool:
            for d in ids:
                if d not in off and (journal.trace(d).connected or not fleet.running(d)):
                    off.add(d)
                    fleet.agents[d].stop()
            return len(off) == len(ids)

        await fleet.wait_until(switch_off_connected, sim.options.up_timeout())
        await fleet.stop()
        checks = [
            Check(
                "every device enrolled and connected, then was switched off",
                all(journal.trace(d).connects for d in ids),
                f"{sum(1 for d in ids if journal.trace(d).connects):,}/{len(ids):,}",
            )
        ]
        idents = {d: Keystore(fleet.config_of(d).state_dir).load() for d in ids}
        expiry = max((i.not_after for i in idents.values() if i is not None), default=None)
        renewed = sum(1 for d in ids if journal.trace(d).renewed)
        if expiry is not None:
            wait = (expiry - datetime.now(UTC)).total_seconds() + 0.5
            sim.journal.mark(sim.seconds(), "switched off")
            await asyncio.sleep(max(0.0, wait))

        back_on = sim.seconds()
        sim.journal.mark(back_on, "switched on, certificates expired")
        await fleet.start(ids, sim.options.ramp)
        await fleet.wait_until(lambda: not any(fleet.running(d) for d in ids), 30.0)
        stuck = [
            d
            for d in ids
            if journal.trace(d).outcome is not Outcome.NEEDS_TOKEN
            or any(c > back_on for c in journal.trace(d).connects)
        ]
        checks.append(
            Check(
                "each agent stopped with 'needs a new token' (no retry loop, no connect)",
                not stuck and renewed == 0,
                f"{len(ids) - len(stuck):,}/{len(ids):,} stopped with "
                f"{journal.trace(ids[0]).reason or '?'} (exit code 5)",
            )
        )
        sample = next((d for d in ids if idents[d] is not None), None)
        if sample is not None:
            ident = idents[sample]
            assert ident is not None
            ok, why = await broker_refuses(sim, sample, ident)
            checks.append(Check("the broker refuses an expired certificate", ok, why))
            ok, why = await renewal_refused(sim, sample, ident)
            checks.append(Check("the EST server refuses to renew it", ok, why))

        # The documented recovery: a new token from the operator, then the agent again.
        from provisioning.lifecycle import reissue_token

        config = load_server_config(layout.config)
        now = datetime.now(UTC)
        for d in ids:
            issued = reissue_token(
                registry, layout, config, DeviceId(d), ttl=None, now=now, out_dir=None, force=True
            )
            write_atomic(fleet.config_of(d).token_file, issued.token.encode() + b"\n")
        recovered_at = sim.seconds()
        sim.journal.mark(recovered_at, "tokens reissued")
        await fleet.start(ids, sim.options.ramp)
        await fleet.wait_until(
            lambda: all(journal.trace(d).connected or not fleet.running(d) for d in ids),
            sim.options.up_timeout(),
        )
        back = [
            d
            for d in ids
            if journal.trace(d).connected
            and len(set(journal.trace(d).serials)) >= 2
            and any(c > recovered_at for c in journal.trace(d).connects)
        ]
        checks.append(
            Check(
                "after a reissued token every device re-bootstraps and reconnects",
                len(back) == len(ids),
                f"{len(back):,}/{len(ids):,} reconnected with a new certificate",
            )
        )
        return await sim.finish(checks)
