"""The pure admission decision: client id, certificate, registry records and time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from enroll_server.broker.policy import (
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    Admission,
    KeepalivePolicy,
    Refusal,
    RefusalReason,
    check_will,
    decide_connect,
)
from enroll_server.pki.ca import build_server_certificate
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.registry.models import (
    CertificateRecord,
    CertStatus,
    Device,
    DeviceState,
    Role,
)
from fleetpki.identity import DeviceId
from fleetpki.topics import Role as TopicRole
from tests.pki_helpers import MemoryCa

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)


def _device(device_id: str, state: str = "active", role: str = "device") -> Device:
    return Device(
        device_id=DeviceId(device_id),
        role=Role(role),
        batch_id=None,
        state=DeviceState(state),
        created_at=NOW,
        updated_at=NOW,
        enrolled_at=NOW,
        token_expires_at=None,
    )


def _record(cert: x509.Certificate, device_id: str, status: str = "active") -> CertificateRecord:
    return CertificateRecord(
        serial=cert.serial_number,
        device_id=DeviceId(device_id),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        issued_at=NOW,
        status=CertStatus(status),
        revoked_at=None,
        revocation_reason=None,
        pem="",
    )


def _cert(ca: MemoryCa, device_id: str, role: str = "device") -> x509.Certificate:
    key = generate_key(KeyType.EC_P256)
    return build_device_certificate(
        key.public_key(),
        DeviceId(device_id),
        ca.issuing,
        NOW,
        DeviceProfile(validity=timedelta(days=30)),
        Role(role),
    )


def _reason(decision: Admission | Refusal) -> RefusalReason:
    assert isinstance(decision, Refusal), f"expected a refusal, got {decision}"
    return decision.reason


def test_active_device_with_active_certificate_is_admitted(ca: MemoryCa) -> None:
    cert = _cert(ca, "dev1")
    decision = decide_connect("dev1", cert, _device("dev1"), _record(cert, "dev1"), NOW)
    assert decision == Admission(
        "dev1", TopicRole.DEVICE, cert.serial_number, cert.not_valid_after_utc
    )


def test_service_identity_is_admitted_with_its_role(ca: MemoryCa) -> None:
    cert = _cert(ca, "backend", role="service")
    device = _device("backend", role="service")
    decision = decide_connect("backend", cert, device, _record(cert, "backend"), NOW)
    assert isinstance(decision, Admission)
    assert decision.role is TopicRole.SERVICE


def test_no_certificate_is_refused() -> None:
    assert _reason(decide_connect("dev1", None, None, None, NOW)) is RefusalReason.NO_CERTIFICATE


@pytest.mark.parametrize("client_id", ["dev2", "DEV1", "", None, "dev1/x", "dev1 "])
def test_client_id_must_be_the_certificate_cn(ca: MemoryCa, client_id: str | None) -> None:
    cert = _cert(ca, "dev1")
    reason = _reason(decide_connect(client_id, cert, _device("dev1"), _record(cert, "dev1"), NOW))
    assert reason in (RefusalReason.CLIENT_ID_MISMATCH, RefusalReason.CLIENT_ID_INVALID)
    assert Refusal(reason, "").connack_code == CONNACK_IDENTIFIER_REJECTED


def test_certificate_validity_is_checked_at_now(ca: MemoryCa) -> None:
    cert = _cert(ca, "dev1")
    dev, rec = _device("dev1"), _record(cert, "dev1")
    before = cert.not_valid_before_utc - timedelta(seconds=1)
    after = cert.not_valid_after_utc + timedelta(seconds=1)
    assert (
        _reason(decide_connect("dev1", cert, dev, rec, before)) is RefusalReason.CERT_NOT_YET_VALID
    )
    assert _reason(decide_connect("dev1", cert, dev, rec, after)) is RefusalReason.CERT_EXPIRED
    # RFC 5280 4.1.2.5: both ends of the validity period are inclusive.
    assert isinstance(decide_connect("dev1", cert, dev, rec, cert.not_valid_after_utc), Admission)


def test_server_auth_certificate_is_refused(ca: MemoryCa) -> None:
    key = generate_key(KeyType.EC_P256)
    cert = build_server_certificate(key.public_key(), ca.issuing, ["dev1"], NOW)
    decision = decide_connect("dev1", cert, _device("dev1"), _record(cert, "dev1"), NOW)
    assert _reason(decision) is RefusalReason.CERT_WRONG_USAGE
    assert isinstance(decision, Refusal) and decision.connack_code == CONNACK_NOT_AUTHORIZED


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ("suspended", RefusalReason.DEVICE_SUSPENDED),
        ("revoked", RefusalReason.DEVICE_REVOKED),
        ("provisioned", RefusalReason.DEVICE_NOT_ACTIVE),
    ],
)
def test_device_must_be_active(ca: MemoryCa, state: str, reason: RefusalReason) -> None:
    cert = _cert(ca, "dev1")
    decision = decide_connect("dev1", cert, _device("dev1", state), _record(cert, "dev1"), NOW)
    assert _reason(decision) is reason


def test_unregistered_identity_is_refused(ca: MemoryCa) -> None:
    cert = _cert(ca, "dev1")
    assert _reason(decide_connect("dev1", cert, None, None, NOW)) is RefusalReason.UNKNOWN_DEVICE
    other = _device("dev2")
    assert _reason(decide_connect("dev1", cert, other, None, NOW)) is RefusalReason.UNKNOWN_DEVICE


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("revoked", RefusalReason.CERT_REVOKED),
        ("on_hold", RefusalReason.CERT_SUSPENDED),
    ],
)
def test_certificate_must_be_active_in_the_registry(
    ca: MemoryCa, status: str, reason: RefusalReason
) -> None:
    cert = _cert(ca, "dev1")
    record = _record(cert, "dev1", status)
    assert _reason(decide_connect("dev1", cert, _device("dev1"), record, NOW)) is reason


def test_superseded_certificate_is_admitted_until_it_expires(ca: MemoryCa) -> None:
    """Power lost mid-renewal: the device returns with its old (superseded) certificate."""
    cert = _cert(ca, "dev1")
    record = _record(cert, "dev1", "superseded")
    assert isinstance(decide_connect("dev1", cert, _device("dev1"), record, NOW), Admission)


def test_certificate_unknown_to_the_registry_is_refused(ca: MemoryCa) -> None:
    cert = _cert(ca, "dev1")
    other = _cert(ca, "dev1")
    dev = _device("dev1")
    assert _reason(decide_connect("dev1", cert, dev, None, NOW)) is RefusalReason.CERT_UNKNOWN
    mismatched = _record(other, "dev1")
    assert _reason(decide_connect("dev1", cert, dev, mismatched, NOW)) is RefusalReason.CERT_UNKNOWN


def test_certificate_recorded_for_another_device_is_refused(ca: MemoryCa) -> None:
    cert = _cert(ca, "dev1")
    record = _record(cert, "dev2")
    decision = decide_connect("dev1", cert, _device("dev1"), record, NOW)
    assert _reason(decision) is RefusalReason.CERT_IDENTITY_MISMATCH


def test_role_must_match_the_certificate_uri(ca: MemoryCa) -> None:
    device_cert = _cert(ca, "backend")  # urn:fleetpki:device:backend
    service = _device("backend", role="service")
    decision = decide_connect("backend", device_cert, service, _record(device_cert, "backend"), NOW)
    assert _reason(decision) is RefusalReason.CERT_IDENTITY_MISMATCH
    service_cert = _cert(ca, "dev1", role="service")
    decision = decide_connect(
        "dev1", service_cert, _device("dev1"), _record(service_cert, "dev1"), NOW
    )
    assert _reason(decision) is RefusalReason.CERT_IDENTITY_MISMATCH


def test_will_topic_follows_the_publish_rule() -> None:
    device = Admission("dev1", TopicRole.DEVICE, 1, NOW)
    assert check_will(device, None) is None
    assert check_will(device, "devices/dev1/status") is None
    refusal = check_will(device, "devices/dev2/commands")
    assert refusal is not None and refusal.reason is RefusalReason.WILL_TOPIC_DENIED
    service = Admission("backend", TopicRole.SERVICE, 2, NOW)
    assert check_will(service, "devices/dev1/commands") is None
    assert check_will(service, "devices/dev1/telemetry") is not None


def test_keepalive_policy() -> None:
    policy = KeepalivePolicy(factor=1.5, max_seconds=600)
    assert policy.check(60) is None
    assert policy.check(600) is None
    for bad in (0, 601):
        refusal = policy.check(bad)
        assert refusal is not None and refusal.reason is RefusalReason.KEEPALIVE_OUT_OF_RANGE
        assert refusal.connack_code == CONNACK_IDENTIFIER_REJECTED
    assert policy.idle_limit(60) == 90.0
    assert policy.idle_limit(0) is None
    assert KeepalivePolicy(max_seconds=None).check(0) is None
    with pytest.raises(ValueError, match="factor"):
        KeepalivePolicy(factor=0.5)
    with pytest.raises(ValueError, match="max keepalive"):
        KeepalivePolicy(max_seconds=70000)


def test_registry_outage_answers_server_unavailable() -> None:
    refusal = Refusal(RefusalReason.REGISTRY_UNAVAILABLE, "db locked")
    assert refusal.connack_code == CONNACK_SERVER_UNAVAILABLE


def test_only_the_recorded_certificate_passes_not_its_serial(ca: MemoryCa) -> None:
    """Serials are public: a certificate with a recorded serial and CN but other bytes (here
    our own CA's, to get past TLS in a test; a foreign CA's in the attack) is not admitted."""
    genuine = _cert(ca, "dev1")
    twin = build_device_certificate(
        generate_key(KeyType.EC_P256).public_key(),
        DeviceId("dev1"),
        ca.issuing,
        NOW,
        DeviceProfile(validity=timedelta(days=30)),
        serial=genuine.serial_number,
    )
    record = _record(genuine, "dev1")
    assert isinstance(decide_connect("dev1", genuine, _device("dev1"), record, NOW), Admission)
    decision = decide_connect("dev1", twin, _device("dev1"), record, NOW)
    assert _reason(decision) is RefusalReason.CERT_UNKNOWN
    assert "fingerprint differs" in decision.detail  # type: ignore[union-attr]
