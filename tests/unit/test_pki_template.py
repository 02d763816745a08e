"""The certificate template issues byte for byte what build_device_certificate builds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from enroll_server.pki import der
from enroll_server.pki.ca import Issuer
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.pki.serial import new_serial
from enroll_server.pki.template import (
    BuilderCertificates,
    CertificateTemplate,
    TemplateMismatch,
    device_certificates,
)
from fleetpki.identity import DeviceId
from fleetpki.topics import Role
from tests.pki_helpers import MemoryCa, make_ca

NOW = datetime(2026, 12, 3, 7, 45, 12, 987654, tzinfo=UTC)


def _same_as_builder(
    issuer: Issuer,
    key: x509.CertificatePublicKeyTypes,
    device: str,
    now: datetime,
    profile: DeviceProfile,
    role: Role = Role.DEVICE,
) -> x509.Certificate:
    """Issue with the template and the builder for the same inputs; assert the TBS agree."""
    serial = new_serial()
    template = CertificateTemplate(issuer)
    signed = template.issue(key, DeviceId(device), now, profile, role, serial=serial)  # type: ignore[arg-type]
    built = build_device_certificate(
        key,  # type: ignore[arg-type]
        DeviceId(device),
        issuer,
        now,
        profile,
        role=role,
        serial=serial,
    )
    cert = x509.load_der_x509_certificate(signed.der)
    assert cert.tbs_certificate_bytes == built.tbs_certificate_bytes
    assert cert.signature_algorithm_oid == built.signature_algorithm_oid
    assert (signed.serial, signed.not_before, signed.not_after) == (
        built.serial_number,
        built.not_valid_before_utc,
        built.not_valid_after_utc,
    )
    # The signature is the issuer's over exactly this TBS.
    cert.verify_directly_issued_by(issuer.cert)
    return cert


@pytest.mark.parametrize("ca_kind", list(KeyType))
def test_every_issuer_key_type(ca_kind: KeyType) -> None:
    ca = make_ca(ca_kind)
    for device_kind in KeyType:
        key = generate_key(device_kind).public_key()
        _same_as_builder(ca.issuing, key, "dev-0001", NOW, DeviceProfile())


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("device", ["a", "dev-0001", "X" * 64, "Z9_" + "-" * 40])
def test_roles_and_id_lengths(ca: MemoryCa, role: Role, device: str) -> None:
    # 64-character ids push the subject, SAN and TBS lengths past the short DER form.
    cert = _same_as_builder(
        ca.issuing, generate_key(KeyType.EC_P384).public_key(), device, NOW, DeviceProfile(), role
    )
    uri = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uri.get_values_for_type(x509.UniformResourceIdentifier)[0].endswith(":" + device)


@pytest.mark.parametrize(
    "now",
    [
        NOW,
        NOW.replace(microsecond=0),
        # Another zone: the builder writes UTC, and so must the template.
        NOW.astimezone(timezone(timedelta(hours=-7, minutes=-30))),
    ],
)
def test_times_in_any_zone(ca: MemoryCa, now: datetime) -> None:
    _same_as_builder(
        ca.issuing, generate_key(KeyType.EC_P256).public_key(), "dev-1", now, DeviceProfile()
    )


@pytest.mark.parametrize("fraction", [0, 300_000, 700_000])
def test_fractions_of_a_second_in_the_profile(ca: MemoryCa, fraction: int) -> None:
    # The builder truncates after the arithmetic: 10.7 s - 1.5 s is 9 s, not 10 s - 1.5 s.
    profile = DeviceProfile(
        validity=timedelta(seconds=9, microseconds=fraction), backdate=timedelta(milliseconds=1500)
    )
    now = NOW.replace(microsecond=700_000)
    _same_as_builder(ca.issuing, generate_key(KeyType.EC_P256).public_key(), "d", now, profile)


def test_naive_time_is_refused(ca: MemoryCa) -> None:
    key = generate_key(KeyType.EC_P256).public_key()
    with pytest.raises(TypeError, match="timezone-aware"):
        CertificateTemplate(ca.issuing).issue(
            key, DeviceId("d"), NOW.replace(tzinfo=None), DeviceProfile()
        )


def test_validity_crossing_2050_and_clipped_at_the_issuer(ca: MemoryCa) -> None:
    # RFC 5280 4.1.2.5: GeneralizedTime from 2050. The issuing CA in make_ca expires in five
    # years, so a 40-year profile is clipped to it; a 2049 start crosses into GeneralizedTime.
    key = generate_key(KeyType.EC_P256).public_key()
    cert = _same_as_builder(
        ca.issuing, key, "d", NOW, DeviceProfile(validity=timedelta(days=40 * 365))
    )
    assert cert.not_valid_after_utc == ca.issuing.cert.not_valid_after_utc
    late = make_ca(now=datetime(2049, 12, 20, tzinfo=UTC))
    cert = _same_as_builder(
        late.issuing, key, "d", datetime(2049, 12, 31, 23, 0, tzinfo=UTC), DeviceProfile()
    )
    assert cert.not_valid_after_utc.year == 2050
    assert cert.not_valid_before_utc.year == 2049


def test_issuer_without_urls_has_no_cdp_or_aia(ca: MemoryCa) -> None:
    bare = replace(ca.issuing, urls=None)
    cert = _same_as_builder(
        bare, generate_key(KeyType.ED25519).public_key(), "dev-1", NOW, DeviceProfile()
    )
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)


def test_ski_is_sha1_of_the_public_key_bits(ca: MemoryCa) -> None:
    key = generate_key(KeyType.RSA_2048).public_key()
    signed = CertificateTemplate(ca.issuing).issue(key, DeviceId("d"), NOW, DeviceProfile())
    cert = x509.load_der_x509_certificate(signed.der)
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key)


def test_serials_are_fresh_when_not_given(ca: MemoryCa) -> None:
    template = CertificateTemplate(ca.issuing)
    key = generate_key(KeyType.EC_P256).public_key()
    serials = {template.issue(key, DeviceId("d"), NOW, DeviceProfile()).serial for _ in range(20)}
    assert len(serials) == 20
    assert all(s.bit_length() == 159 for s in serials)


class _OddKey:
    """An issuer key the template has no signer for (stands for a future key type)."""

    def __init__(self, real: ec.EllipticCurvePrivateKey) -> None:
        self._real = real

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._real.public_key()

    def sign(self, data: bytes, algorithm: ec.ECDSA) -> bytes:
        return self._real.sign(data, algorithm)


def test_mismatch_falls_back_to_the_builder(ca: MemoryCa) -> None:
    seen: list[TemplateMismatch] = []
    odd = replace(ca.issuing, key=_OddKey(ca.issuing.key))  # type: ignore[arg-type]
    certificates = device_certificates(odd, seen.append)
    assert isinstance(certificates, BuilderCertificates)
    assert len(seen) == 1 and "no signer" in seen[0].reason
    assert isinstance(device_certificates(ca.issuing), CertificateTemplate)


def test_der_integer_and_lengths() -> None:
    assert der.encode_integer(0) == b"\x02\x01\x00"
    assert der.encode_integer(127) == b"\x02\x01\x7f"
    assert der.encode_integer(128) == b"\x02\x02\x00\x80"  # stays positive (X.690 8.3.2)
    assert der.encode_integer(1 << 158)[:3] == b"\x02\x14\x40"  # a serial: 20 octets
    with pytest.raises(ValueError, match="negative"):
        der.encode_integer(-1)
    assert der.encode(0x04, b"x" * 127)[:2] == b"\x04\x7f"
    assert der.encode(0x04, b"x" * 128)[:3] == b"\x04\x81\x80"
    assert der.encode(0x04, b"x" * 256)[:4] == b"\x04\x82\x01\x00"
    element = der.encode(0x30, der.encode(0x02, b"\x01") + der.encode(0x04, b"y" * 300))
    _, start, end = der.read(element)
    assert [c[:1] for c in der.children(element, start, end)] == [b"\x02", b"\x04"]
    with pytest.raises(ValueError, match="past the end"):
        der.read(element[:-1])


def test_signatures_verify_for_each_issuer_kind() -> None:
    for kind in (KeyType.RSA_2048, KeyType.ED25519, KeyType.EC_P384):
        ca = make_ca(kind)
        signed = CertificateTemplate(ca.issuing).issue(
            generate_key(KeyType.EC_P256).public_key(), DeviceId("d"), NOW, DeviceProfile()
        )
        cert = x509.load_der_x509_certificate(signed.der)
        public = ca.issuing.cert.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(
                cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256()
            )
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
