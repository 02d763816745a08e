"""One current certificate per identity, over real EST, the embedded broker, CRL and OCSP:
only the newest certificate renews (or its fallback while the newest was never used), and
every older one is cut off everywhere once the newest is used."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import hash_secret, new_secret
from enroll_server.pki.keys import KeyType, PrivateKey, generate_key
from enroll_server.registry import CertStatus
from fleetpki.identity import DeviceId
from tests.est_client import Reply, request
from tests.integration.broker_harness import (
    PAHO_ACCEPTED,
    PAHO_NOT_AUTHORIZED,
    Creds,
    PahoDevice,
    eventually,
)
from tests.integration.test_est import EST, b64, enroll, leaf, write_identity
from tests.live_server import LiveServer
from tests.pki_helpers import csr_der, make_csr


@dataclass
class Held:
    """A certificate and its key on disk, as a device (or a thief) holds them."""

    device_id: str
    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def creds(self) -> Creds:
        return Creds(self.device_id, self.cert, self.key, self.cert_path, self.key_path)


def _hold(folder: Path, device_id: str, cert: x509.Certificate, key: PrivateKey) -> Held:
    folder.mkdir(parents=True)
    cert_path, key_path = write_identity(folder, cert, key)
    return Held(device_id, cert, key, cert_path, key_path)


def enrolled(server: LiveServer, tmp_path: Path, device_id: str, token: str | None = None) -> Held:
    key = generate_key(KeyType.EC_P256)
    reply = enroll(server, device_id, token or server.mint_device(device_id), key)
    assert reply.status == 200, reply.text
    cert = leaf(decode_certs_only(reply.body))
    return _hold(tmp_path / f"{device_id}-{cert.serial_number:x}", device_id, cert, key)


def reenroll(server: LiveServer, held: Held) -> Reply:
    key = generate_key(KeyType.EC_P256)
    return request(
        server.est_url + EST + "/simplereenroll",
        server.client_ssl(held.cert_path, held.key_path),
        "POST",
        b64(csr_der(make_csr(key, held.device_id))),
        {"Content-Type": "application/pkcs10"},
    )


def renewed(server: LiveServer, held: Held, tmp_path: Path) -> Held:
    key = generate_key(KeyType.EC_P256)
    reply = request(
        server.est_url + EST + "/simplereenroll",
        server.client_ssl(held.cert_path, held.key_path),
        "POST",
        b64(csr_der(make_csr(key, held.device_id))),
        {"Content-Type": "application/pkcs10"},
    )
    assert reply.status == 200, reply.text
    cert = leaf(decode_certs_only(reply.body))
    return _hold(tmp_path / f"{held.device_id}-{cert.serial_number:x}", held.device_id, cert, key)


def statuses(server: LiveServer, device_id: str) -> dict[int, tuple[str, str | None]]:
    return {
        c.serial: (c.status.value, c.revocation_reason)
        for c in server.registry.certificates_of(DeviceId(device_id))
    }


def crl_reasons(server: LiveServer, serials: list[int]) -> dict[int, x509.ReasonFlags | None]:
    """The CRL's reason for each serial it lists, waiting (5 s) until it lists them all."""
    deadline = time.monotonic() + 5
    while True:
        crl = x509.load_der_x509_crl(request(server.http_url + "/crl", None).body)
        found: dict[int, x509.ReasonFlags | None] = {}
        for serial in serials:
            entry = crl.get_revoked_certificate_by_serial_number(serial)
            if entry is None:
                continue
            try:
                found[serial] = entry.extensions.get_extension_for_class(
                    x509.CRLReason
                ).value.reason
            except x509.ExtensionNotFound:
                found[serial] = None
        if len(found) == len(serials) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def ocsp_status(server: LiveServer, cert: x509.Certificate) -> ocsp.OCSPResponse:
    issuer = server.handle.home.issuer.cert
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    reply = request(
        server.http_url + "/ocsp",
        None,
        "POST",
        req.public_bytes(serialization.Encoding.DER),
        {"Content-Type": "application/ocsp-request"},
    )
    return ocsp.load_der_ocsp_response(reply.body)


async def connack(server: LiveServer, held: Held) -> int | None:
    client = PahoDevice(held.creds(), server.mqtt_port, server.layout.root_cert)
    try:
        return await client.connect()
    finally:
        await client.close()


async def test_renewing_a_to_b_then_a_to_c_leaves_one_chain_and_cuts_off_the_rest(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    server = live_stack
    a = enrolled(server, tmp_path, "dev-abc")
    b = renewed(server, a, tmp_path)
    # The device lost B to a power cut before storing it: A, its fallback, renews again. B
    # was never used, so this is allowed, and B is cut off.
    c = renewed(server, a, tmp_path)
    assert statuses(server, "dev-abc") == {
        a.serial: ("superseded", None),
        b.serial: ("revoked", "superseded"),
        c.serial: ("active", None),
    }
    assert await connack(server, b) == PAHO_NOT_AUTHORIZED
    # C's first use (the broker admits it) cuts off its fallback A everywhere.
    assert await connack(server, c) == PAHO_ACCEPTED
    await eventually(
        lambda: statuses(server, "dev-abc")[a.serial] == ("revoked", "superseded"),
        3.0,
        "A superseded",
    )
    refused = reenroll(server, a)
    assert refused.status == 403
    assert f"certificate {a.serial:x} of dev-abc is revoked (superseded)" in refused.text
    assert "newest certificate" in refused.text
    assert reenroll(server, b).status == 403
    assert await connack(server, a) == PAHO_NOT_AUTHORIZED
    superseded = x509.ReasonFlags.superseded
    assert crl_reasons(server, [a.serial, b.serial]) == {a.serial: superseded, b.serial: superseded}
    for held in (a, b):
        answer = ocsp_status(server, held.cert)
        assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert answer.revocation_reason is superseded
    assert ocsp_status(server, c.cert).certificate_status is ocsp.OCSPCertStatus.GOOD
    # The one current chain renews on.
    d = renewed(server, c, tmp_path)
    assert [s for s, (st, _) in statuses(server, "dev-abc").items() if st == "active"] == [d.serial]


async def test_a_renewal_that_is_used_drops_the_live_session_of_its_predecessor(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    """A thief connected with the old key loses the session once the renewal is used."""
    server = live_stack
    a = enrolled(server, tmp_path, "dev-thief")
    thief = PahoDevice(a.creds(), server.mqtt_port, server.layout.root_cert)
    try:
        assert await thief.connect() == PAHO_ACCEPTED
        b = renewed(server, a, tmp_path)
        assert thief.connected  # B is not used yet: A is still the fallback
        renewed(server, b, tmp_path)  # B renews: its first use
        started = time.monotonic()
        await eventually(lambda: not thief.connected, 3.0, "the old key's session dropped")
        assert time.monotonic() - started < 1.0
    finally:
        await thief.close()
    assert statuses(server, "dev-thief")[a.serial] == ("revoked", "superseded")


def test_a_new_enrollment_with_a_reissued_token_cuts_off_the_old_certificates(
    live_server: LiveServer, tmp_path: Path
) -> None:
    """`batch reissue-token --force` + enrollment: the old key neither renews nor stays good."""
    server = live_server
    old = enrolled(server, tmp_path, "dev-again")
    fallback_renewal = renewed(server, old, tmp_path)
    # What `batch reissue-token --force` records: a new token for the enrolled device.
    token = new_secret()
    now = datetime.now(UTC)
    server.registry.add_token(DeviceId("dev-again"), hash_secret(token), now + timedelta(1), now)
    new = enrolled(server, tmp_path / "again", "dev-again", token)
    assert statuses(server, "dev-again") == {
        old.serial: ("revoked", "superseded"),
        fallback_renewal.serial: ("revoked", "superseded"),
        new.serial: ("active", None),
    }
    assert reenroll(server, old).status == 403
    assert reenroll(server, fallback_renewal).status == 403
    assert ocsp_status(server, old.cert).certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert CertStatus.ACTIVE is server.registry.get_certificate(new.serial).status  # type: ignore[union-attr]


def test_suspension_lists_the_superseded_certificate_in_crl_and_ocsp(
    live_server: LiveServer, tmp_path: Path
) -> None:
    """mosquitto knows only the CRL: a suspended device's previous certificate must be on it."""
    server = live_server
    a = enrolled(server, tmp_path, "dev-held")
    b = renewed(server, a, tmp_path)
    now = datetime.now(UTC)
    server.registry.suspend_device(DeviceId("dev-held"), now=now, actor="test")
    hold = x509.ReasonFlags.certificate_hold
    assert crl_reasons(server, [a.serial, b.serial]) == {a.serial: hold, b.serial: hold}
    for held in (a, b):
        answer = ocsp_status(server, held.cert)
        assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
        assert answer.revocation_reason is hold
        assert reenroll(server, held).status == 403
    server.registry.resume_device(DeviceId("dev-held"), now=now, actor="test")
    assert statuses(server, "dev-held") == {
        a.serial: ("superseded", None),
        b.serial: ("active", None),
    }
    assert ocsp_status(server, a.cert).certificate_status is ocsp.OCSPCertStatus.GOOD
