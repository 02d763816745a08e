"""renewal-storm: short certificates; every device renews, rotates its key, and none is lost."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.registry import CertStatus
from fleetpki.identity import DeviceId
from simulators.report import Check, Report
from simulators.scenarios.base import Scenario

if TYPE_CHECKING:
    from simulators.simulation import Simulation, SimulationOptions

RENEWALS = 2  # each device must renew this many times


def _spki(pem: str) -> bytes:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class RenewalStorm(Scenario):
    name = "renewal-storm"
    summary = (
        f"certificates of a few seconds: every device renews {RENEWALS} times over EST "
        "simplereenroll with a fresh key each time, reconnects with the new certificate, and "
        "none is lost (all connected at the end, old certificates superseded, no telemetry lost)"
    )
    hosted_only = "needs certificates a few seconds long"

    def validity(self, options: SimulationOptions) -> timedelta:
        # Long enough that the whole fleet is up before the first renewals are due, so that
        # renewals of early devices do not compete with enrollments of late ones.
        return timedelta(seconds=6 + options.devices * 0.01)

    def backdate(self, options: SimulationOptions) -> timedelta:
        return timedelta(seconds=1)

    async def run(self, sim: Simulation) -> Report:
        fleet, registry = sim.fleet, sim.registry
        assert fleet is not None and registry is not None and sim.stack is not None
        checks = [await sim.bring_up()]
        lifetime = self.validity(sim.options).total_seconds() + 1
        journal = sim.journal
        traces = [journal.trace(d) for d in fleet.ids]

        def done() -> bool:
            return all(
                len(t.renewed) >= RENEWALS and t.connected and t.connects[-1] > t.renewed[-1]
                for t in traces
            )

        await fleet.wait_until(done, lifetime * (RENEWALS + 1) + sim.options.up_timeout())
        renewed = [t for t in traces if len(t.renewed) >= RENEWALS]
        checks.append(
            Check(
                f"every device renewed {RENEWALS} times",
                len(renewed) == len(traces),
                f"{len(renewed):,}/{len(traces):,}; {sum(len(t.renewed) for t in traces):,} "
                "renewals in all",
            )
        )
        rotated = 0
        superseded_ok = 0
        for device_id in fleet.ids:
            certs = registry.certificates_of(DeviceId(device_id))
            keys = {_spki(c.pem) for c in certs}
            if len(certs) >= RENEWALS + 1 and len(keys) == len(certs):
                rotated += 1
            *older, newest = sorted(certs, key=lambda c: c.not_before)
            # One current certificate: every older one is cut off (revoked, reason superseded)
            # but the newest's fallback while the newest is still unused (registry.certificates).
            if older and all(
                (c.status is CertStatus.REVOKED and c.revocation_reason == "superseded")
                or (c.status is CertStatus.SUPERSEDED and newest.fallback_serial == c.serial)
                for c in older
            ):
                superseded_ok += 1
        checks.append(
            Check(
                "a fresh key at every renewal (no key reused)",
                rotated == len(traces),
                f"{rotated:,}/{len(traces):,} devices: one distinct key per certificate",
            )
        )
        checks.append(
            Check(
                "older certificates cut off (superseded) in the registry",
                superseded_ok == len(traces),
                f"{superseded_ok:,}/{len(traces):,} devices",
            )
        )
        sessions = await sim.stack.broker_sessions()
        live = [
            d
            for d in fleet.ids
            if journal.trace(d).connected
            and d in sessions
            and format(sessions[d], "x") == journal.trace(d).serials[-1]
        ]
        checks.append(
            Check(
                "none lost: every device connected with its newest certificate",
                len(live) == len(traces),
                f"{len(live):,}/{len(traces):,} broker sessions use the device's newest serial",
            )
        )
        return await sim.finish(checks, extra={"validity_s": lifetime - 1})
