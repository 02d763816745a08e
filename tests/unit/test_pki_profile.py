"""The CA hierarchy and the device certificate profile, asserted extension by extension."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from enroll_server.pki import serial as serial_module
from enroll_server.pki.ca import Issuer
from enroll_server.pki.keys import KeyType, generate_key, key_type_of
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.pki.serial import new_serial
from fleetpki.identity import DeviceId
from fleetpki.topics import Role
from tests.pki_helpers import URLS, MemoryCa, make_ca


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def test_root_and_issuing_ca_constraints(ca: MemoryCa) -> None:
    root_bc = ext(ca.root.cert, x509.BasicConstraints)
    assert root_bc.critical and root_bc.value.ca and root_bc.value.path_length == 1
    iss_bc = ext(ca.issuing.cert, x509.BasicConstraints)
    assert iss_bc.critical and iss_bc.value.ca and iss_bc.value.path_length == 0
    assert ca.root.cert.issuer == ca.root.cert.subject
    assert ca.issuing.cert.issuer == ca.root.cert.subject
    ku = ext(ca.issuing.cert, x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    aki = ext(ca.issuing.cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca.root.cert, x509.SubjectKeyIdentifier).value.digest
    ca.issuing.cert.verify_directly_issued_by(ca.root.cert)


def test_server_certificate_is_server_auth_with_sans(ca: MemoryCa) -> None:
    cert = ca.server_cert
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext(cert, x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert ext(cert, x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(ca.issuing.cert)


def test_device_certificate_profile(ca: MemoryCa) -> None:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    key = generate_key(KeyType.EC_P256)
    profile = DeviceProfile(validity=timedelta(days=30), backdate=timedelta(minutes=5))
    cert = build_device_certificate(
        key.public_key(), DeviceId("dev-0001"), ca.issuing, now, profile
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-0001"
    san = ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fleetpki:device:dev-0001"
    ]
    eku = ext(cert, x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert eku.value[0].dotted_string == "1.3.6.1.5.5.7.3.2"
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca.issuing.cert, x509.SubjectKeyIdentifier).value.digest
    cdp = ext(cert, x509.CRLDistributionPoints).value
    assert cdp[0].full_name[0].value == URLS.crl
    aia = ext(cert, x509.AuthorityInformationAccess).value
    by_method = {d.access_method: d.access_location.value for d in aia}
    assert by_method[AuthorityInformationAccessOID.OCSP] == URLS.ocsp
    assert by_method[AuthorityInformationAccessOID.CA_ISSUERS] == URLS.ca_issuers
    assert cert.not_valid_before_utc == now - timedelta(minutes=5)
    assert cert.not_valid_after_utc == now + timedelta(days=30)
    assert cert.serial_number.bit_length() >= 128
    assert cert.serial_number > 0 and cert.serial_number.bit_length() <= 159
    cert.verify_directly_issued_by(ca.issuing.cert)


def test_service_certificate_uses_service_urn(ca: MemoryCa) -> None:
    key = generate_key(KeyType.EC_P256)
    cert = build_device_certificate(
        key.public_key(),
        DeviceId("backend"),
        ca.issuing,
        datetime.now(UTC),
        DeviceProfile(),
        role=Role.SERVICE,
    )
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fleetpki:service:backend"
    ]


def test_device_certificate_never_outlives_its_issuer(ca: MemoryCa) -> None:
    key = generate_key(KeyType.EC_P256)
    now = datetime.now(UTC)
    cert = build_device_certificate(
        key.public_key(),
        DeviceId("dev-long"),
        ca.issuing,
        now,
        DeviceProfile(validity=timedelta(days=100 * 365)),
    )
    assert cert.not_valid_after_utc == ca.issuing.cert.not_valid_after_utc


@pytest.mark.parametrize("kind", list(KeyType))
def test_every_key_type_builds_a_hierarchy(kind: KeyType) -> None:
    test_ca = make_ca(kind)
    cert, _key = test_ca.device_cert("dev-x", key=generate_key(kind))
    cert.verify_directly_issued_by(test_ca.issuing.cert)
    assert key_type_of(cert.public_key()) is kind
    expected = {
        KeyType.EC_P256: ec.EllipticCurvePublicKey,
        KeyType.EC_P384: ec.EllipticCurvePublicKey,
        KeyType.RSA_2048: rsa.RSAPublicKey,
        KeyType.RSA_3072: rsa.RSAPublicKey,
        KeyType.ED25519: ed25519.Ed25519PublicKey,
    }[kind]
    assert isinstance(test_ca.root.cert.public_key(), expected)


def test_serials_are_unique_and_bounded() -> None:
    serials = {new_serial() for _ in range(2000)}
    assert len(serials) == 2000
    assert all(s.bit_length() == 159 for s in serials)
    # DER INTEGER of a 159-bit positive number fits in 20 octets (RFC 5280 4.1.2.2).
    assert all(len(s.to_bytes(20, "big", signed=True)) == 20 for s in serials)
    # Fixed width: the registry's hex text sorts like the numbers.
    assert {len(format(s, "x")) for s in serials} == {40}


def test_serials_carry_128_random_bits_under_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_700_000_000_000_000_000]
    monkeypatch.setattr(serial_module.time, "time_ns", lambda: now[0])
    same_ms = [new_serial() for _ in range(200)]
    # Within one millisecond only the low 128 bits differ, and they look random.
    assert len({s >> 128 for s in same_ms}) == 1
    low = [s & ((1 << 128) - 1) for s in same_ms]
    assert len(set(low)) == 200
    ones = sum(bin(x).count("1") for x in low) / (200 * 128)
    assert 0.45 < ones < 0.55
    before = same_ms[0]
    now[0] += 3_000_000  # 3 ms later
    later = new_serial()
    assert later > max(same_ms) and (later >> 128) - (before >> 128) == 3
    assert sorted(format(s, "x") for s in [*same_ms, later])[-1] == format(later, "x")


def test_profile_refuses_non_positive_validity() -> None:
    with pytest.raises(ValueError, match="validity must be positive"):
        DeviceProfile(validity=timedelta(0))


def test_issuer_without_urls_omits_cdp_and_aia(ca: MemoryCa) -> None:
    bare = Issuer(ca.issuing.cert, ca.issuing.key, None)
    key = generate_key(KeyType.EC_P256)
    cert = build_device_certificate(
        key.public_key(), DeviceId("d1"), bare, datetime.now(UTC), DeviceProfile()
    )
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
