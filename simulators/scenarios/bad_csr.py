"""bad-csr: requests the CA must refuse are refused, cost no token, and leave no certificate."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent import http11
from device_agent.tls import client_context
from fleetpki.identity import DeviceId
from simulators.report import Check, Report
from simulators.scenarios.base import Scenario

if TYPE_CHECKING:
    from device_agent.config import AgentConfig
    from simulators.simulation import Simulation

Builder = Callable[[str, str], bytes]  # (device id, another device's id) -> CSR DER


def _csr(
    cn: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    extensions: list[x509.ExtensionType] | None = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _tampered(cn: str, _: str) -> bytes:
    der = bytearray(_csr(cn))
    der[-3] ^= 0x55  # inside the signature value: proof of possession broken
    return bytes(der)


# Each kind of bad request, and the RFC / policy reason the CA must refuse it for.
BAD_CSRS: dict[str, Builder] = {
    "cn-of-another-device": lambda cn, other: _csr(other),
    "asks-to-be-a-ca": lambda cn, _: _csr(cn, extensions=[x509.BasicConstraints(True, None)]),
    "asks-for-serverAuth": lambda cn, _: _csr(
        cn, extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])]
    ),
    "san-of-another-device": lambda cn, other: _csr(
        cn,
        extensions=[
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DeviceId(other).urn)])
        ],
    ),
    # Deliberately weak: the CA must refuse it.
    "weak-rsa-1024-key": lambda cn, _: _csr(
        cn,
        rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
    ),
    "broken-signature": _tampered,
    "not-a-csr": lambda cn, _: b"\x30\x03\x02\x01\x00 this is not PKCS#10",
}


async def send(cfg: AgentConfig, device_id: str, token: str, der: bytes) -> tuple[int, str]:
    """POST a raw request body to simpleenroll with the device's valid token."""
    credentials = base64.b64encode(f"{device_id}:{token}".encode()).decode("ascii")
    headers = {
        "Content-Type": "application/pkcs10",
        "Content-Transfer-Encoding": "base64",
        "Authorization": f"Basic {credentials}",
        "User-Agent": "fleetpki-simulator",
    }
    # base64 with line breaks, as RFC 7030 3.2.2 / 4.2.1 sends it.
    body = base64.encodebytes(der)
    response = await http11.request(
        "POST",
        cfg.server.host,
        cfg.server.port,
        cfg.server.path("simpleenroll"),
        client_context(cfg.trust_anchor),
        headers=headers,
        body=body,
    )
    reason = response.body.decode("utf-8", "replace").strip().splitlines()
    return response.status, reason[0] if reason else response.reason


class BadCsr(Scenario):
    name = "bad-csr"
    in_process_only = "sends bad CSRs with the agents' own configuration"
    summary = (
        "before the devices enroll, requests the CA must refuse are sent with their valid "
        "tokens (another device's CN or SAN, CA:TRUE, serverAuth, an RSA-1024 key, a broken "
        "signature, garbage): each gets 400 with a reason, none yields a certificate or uses "
        "up the token, and the real agents then enroll with the same tokens"
    )

    async def run(self, sim: Simulation) -> Report:
        fleet, registry, bundles = sim.local_fleet, sim.registry, sim.bundle_dir
        assert fleet is not None and registry is not None and bundles is not None
        ids = fleet.ids
        cfgs = {d: fleet.config_of(d) for d in ids}
        outcomes: dict[str, tuple[int, str]] = {}
        for i, (kind, build) in enumerate(BAD_CSRS.items()):
            device_id = ids[i % len(ids)]
            other = ids[(i + 1) % len(ids)] if len(ids) > 1 else f"{device_id}x"
            token = (bundles / device_id / "token").read_text().strip()
            try:
                outcomes[kind] = await send(
                    cfgs[device_id], device_id, token, build(device_id, other)
                )
            except (OSError, TimeoutError, http11.HttpError) as exc:
                outcomes[kind] = (0, str(exc))
        sim.journal.mark(sim.seconds(), "bad CSRs sent")
        refused = {k: v for k, v in outcomes.items() if v[0] == 400}
        checks = [
            Check(
                f"bad CSR refused: {kind}",
                status == 400,
                f"HTTP {status}: {why}",
            )
            for kind, (status, why) in outcomes.items()
        ]
        issued = [d for d in ids if registry.certificates_of(DeviceId(d))]
        checks.append(
            Check(
                "no certificate issued for a bad CSR",
                not issued,
                f"{len(issued)} devices hold a certificate before their agents ran",
            )
        )
        checks.insert(0, await sim.bring_up())
        checks.append(
            Check(
                "tokens not used up by the refused requests",
                all(fleet.journal.trace(d).enrolled is not None for d in ids),
                "every agent then enrolled with its original token",
            )
        )
        return await sim.finish(checks, extra={"refused": len(refused), "sent": len(outcomes)})
