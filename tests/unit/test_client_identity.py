"""The one client-identity check (pki.client_identity), apart from EST and the broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.pki.client_identity import (
    ClientIdentity,
    IdentityProblem,
    IdentityRefusal,
    check_client_certificate,
    fingerprint,
    issued_by,
)
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.registry.models import CertificateRecord, CertStatus, Device, DeviceState
from fleetpki.identity import DeviceId
from fleetpki.topics import Role
from tests.pki_helpers import MemoryCa, make_ca

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)


def _cert(ca: MemoryCa, name: str, serial: int | None = None) -> x509.Certificate:
    return build_device_certificate(
        generate_key(KeyType.EC_P256).public_key(),
        DeviceId(name),
        ca.issuing,
        NOW,
        DeviceProfile(validity=timedelta(days=30)),
        serial=serial,
    )


def _device(name: str) -> Device:
    return Device(DeviceId(name), Role.DEVICE, None, DeviceState.ACTIVE, NOW, NOW, NOW, None)


def _record(cert: x509.Certificate, name: str) -> CertificateRecord:
    return CertificateRecord(
        serial=cert.serial_number,
        device_id=DeviceId(name),
        fingerprint_sha256=fingerprint(cert.public_bytes(serialization.Encoding.DER)),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        issued_at=NOW,
        status=CertStatus.ACTIVE,
        revoked_at=None,
        revocation_reason=None,
        pem="",
    )


def test_the_recorded_certificate_is_the_identity(ca: MemoryCa) -> None:
    cert = _cert(ca, "dev1")
    got = check_client_certificate(cert, _device("dev1"), _record(cert, "dev1"), NOW)
    assert got == ClientIdentity("dev1", Role.DEVICE, cert.serial_number, cert.not_valid_after_utc)
    der = cert.public_bytes(serialization.Encoding.DER)
    again = check_client_certificate(
        cert, _device("dev1"), _record(cert, "dev1"), NOW, fingerprint_sha256=fingerprint(der)
    )
    assert again == got


def test_same_serial_and_name_other_bytes_is_refused(ca: MemoryCa) -> None:
    genuine = _cert(ca, "dev1")
    twin = _cert(ca, "dev1", serial=genuine.serial_number)
    got = check_client_certificate(twin, _device("dev1"), _record(genuine, "dev1"), NOW)
    assert isinstance(got, IdentityRefusal)
    assert got.problem is IdentityProblem.UNKNOWN_CERTIFICATE
    assert "fingerprint differs" in got.detail


def test_issued_by_checks_the_signature() -> None:
    ours, theirs = make_ca(), make_ca()
    cert = _cert(ours, "dev1")
    assert issued_by(cert, ours.issuing.cert)
    assert not issued_by(cert, theirs.issuing.cert)
    assert not issued_by(cert, ours.root.cert)
