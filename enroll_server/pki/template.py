"""Device certificates encoded from a template: the builder's DER, per-device fields slotted in.

cryptography's CertificateBuilder builds ten extension objects in Python and encodes them
afresh for every certificate: ~65 us of the ~90 us an issuance costs, against ~23 us for the
ECDSA signature itself (BENCHMARKS.md, "Enrollment"). But of a device certificate's TBS
(RFC 5280 4.1) only six fields differ from one device to the next: serial, validity, subject,
public key, SAN and SKI. The rest (version, signature algorithm, issuer, basicConstraints,
keyUsage, extendedKeyUsage, AKI, CDP, AIA) is the same bytes every time.

So the template is cut from a certificate that `build_device_certificate` itself made, once
per issuer, and proves itself at once: for a probe device, its TBS must equal the builder's
byte for byte, or the constructor raises TemplateMismatch and the caller keeps the builder
(`device_certificates`). The profile stays defined in one place, profile.py; this module only
re-assembles what the builder wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enroll_server.pki import der
from enroll_server.pki.ca import Issuer
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import PublicKey
from enroll_server.pki.profile import (
    DeviceProfile,
    build_device_certificate,
    end_entity_uri,
)
from enroll_server.pki.serial import new_serial
from enroll_server.pki.signer import SignerError, as_signer
from fleetpki.identity import DeviceId
from fleetpki.topics import Role

_OID_SAN = bytes.fromhex("0603551d11")  # id-ce-subjectAltName, 2.5.29.17
_OID_SKI = bytes.fromhex("0603551d0e")  # id-ce-subjectKeyIdentifier, 2.5.29.14
_CN = bytes.fromhex("0603550403")  # id-at-commonName, 2.5.4.3
_UTF8STRING = 0x0C  # what cryptography's NameAttribute writes for a CN by default
_URI = 0x86  # GeneralName uniformResourceIdentifier [6] IMPLICIT IA5String (RFC 5280 4.2.1.6)


class TemplateMismatch(PkiError):
    """The template did not reproduce the builder's TBS; `reason` says where."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"certificate template does not match the builder: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SignedCertificate:
    """A signed certificate's DER and the fields the registry records (seconds precision)."""

    der: bytes
    serial: int
    not_before: datetime
    not_after: datetime


def _time(t: datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds, Z."""
    clock = f"{t.month:02d}{t.day:02d}{t.hour:02d}{t.minute:02d}{t.second:02d}Z".encode()
    if 1950 <= t.year < 2050:
        return b"\x17\x0d" + f"{t.year % 100:02d}".encode() + clock
    return b"\x18\x0f" + f"{t.year:04d}".encode() + clock


def _key_fields(public_key: PublicKey) -> tuple[bytes, bytes]:
    """(SubjectPublicKeyInfo DER, subjectKeyIdentifier extension DER).

    The SKI is RFC 5280 4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING's value,
    as x509.SubjectKeyIdentifier.from_public_key computes it.
    """
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    _, start, _ = der.read(spki)
    _, _, algorithm_end = der.read(spki, start)
    _, bits_start, bits_end = der.read(spki, algorithm_end)
    digest = hashlib.sha1(spki[bits_start + 1 : bits_end]).digest()  # noqa: S324 (RFC 5280)
    ski = der.encode(0x30, _OID_SKI + der.encode(0x04, der.encode(0x04, digest)))
    return spki, ski


class CertificateTemplate:
    """Issues exactly the certificates `build_device_certificate` would, for one issuer."""

    def __init__(self, issuer: Issuer) -> None:
        # A key in memory or a token (pki/signer.py): the TBS is signed the same way either way.
        try:
            self._sign = as_signer(issuer.key).sign
        except SignerError as exc:
            raise TemplateMismatch(str(exc)) from None
        self._issuer_not_after = issuer.cert.not_valid_after_utc
        probe_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        probe_id = DeviceId("template-probe")
        # Any instant will do (pure: no clock read); the issuer's own start is whole seconds.
        probe_now = issuer.cert.not_valid_before_utc
        probe_serial = new_serial()
        probe_profile = DeviceProfile()
        built = build_device_certificate(
            probe_key, probe_id, issuer, probe_now, probe_profile, serial=probe_serial
        )
        tbs = built.tbs_certificate_bytes
        _, start, end = der.read(tbs)
        fields = list(der.children(tbs, start, end))
        if len(fields) != 8 or fields[0] != b"\xa0\x03\x02\x01\x02" or fields[7][0] != 0xA3:
            raise TemplateMismatch("TBSCertificate is not v3 with 8 fields and extensions")
        self._version = fields[0]
        self._signature_algorithm = fields[2]
        self._issuer = fields[3]
        extensions = der.contents(fields[7])  # [3] EXPLICIT Extensions
        _, start, end = der.read(extensions)
        listed = list(der.children(extensions, start, end))
        oids = [der.contents(e)[:5] for e in listed]
        if oids.count(_OID_SAN) != 1 or oids.count(_OID_SKI) != 1:
            raise TemplateMismatch("expected one subjectAltName and one subjectKeyIdentifier")
        san_at, ski_at = oids.index(_OID_SAN), oids.index(_OID_SKI)
        if ski_at != san_at + 1:
            raise TemplateMismatch("subjectKeyIdentifier does not follow subjectAltName")
        self._extensions_before = b"".join(listed[:san_at])
        self._extensions_after = b"".join(listed[ski_at + 1 :])
        whole = built.public_bytes(Encoding.DER)
        _, start, end = der.read(whole)
        outer = list(der.children(whole, start, end))
        if len(outer) != 3 or outer[0] != tbs or outer[1] != self._signature_algorithm:
            raise TemplateMismatch("Certificate is not TBS, signatureAlgorithm, signature")
        mine, *_ = self._tbs(probe_key, probe_id, probe_now, probe_profile, probe_serial)
        if mine != tbs:
            raise TemplateMismatch(f"probe TBS differs ({len(mine)} vs {len(tbs)} octets)")

    def _tbs(
        self,
        public_key: PublicKey,
        device_id: DeviceId,
        now: datetime,
        profile: DeviceProfile,
        serial: int,
        role: Role = Role.DEVICE,
    ) -> tuple[bytes, datetime, datetime]:
        """(TBSCertificate DER, notBefore, notAfter) of build_device_certificate's certificate."""
        if now.tzinfo is None:
            raise TypeError(f"issuance time must be timezone-aware, got {now!r}")
        if now.tzinfo is not UTC:
            now = now.astimezone(UTC)
        # As build_device_certificate computes them; the builder then drops the fraction of
        # a second (whole seconds in UTCTime/GeneralizedTime, RFC 5280 4.1.2.5.1-2).
        not_before = (now - profile.backdate).replace(microsecond=0)
        # RFC 5280 4.1.2.5: a certificate must not outlive its issuer (as the builder's caller).
        not_after = min(now + profile.validity, self._issuer_not_after).replace(microsecond=0)
        cn = device_id.value.encode()
        subject = der.encode(
            0x30, der.encode(0x31, der.encode(0x30, _CN + der.encode(_UTF8STRING, cn)))
        )
        uri = end_entity_uri(device_id, role).encode()
        san = der.encode(0x30, _OID_SAN + der.encode(0x04, der.encode(0x30, der.encode(_URI, uri))))
        spki, ski = _key_fields(public_key)
        extensions = self._extensions_before + san + ski + self._extensions_after
        tbs = der.encode(
            0x30,
            b"".join(
                (
                    self._version,
                    der.encode_integer(serial),
                    self._signature_algorithm,
                    self._issuer,
                    der.encode(0x30, _time(not_before) + _time(not_after)),
                    subject,
                    spki,
                    der.encode(0xA3, der.encode(0x30, extensions)),
                )
            ),
        )
        return tbs, not_before, not_after

    def issue(
        self,
        public_key: PublicKey,
        device_id: DeviceId,
        now: datetime,
        profile: DeviceProfile,
        role: Role = Role.DEVICE,
        serial: int | None = None,
    ) -> SignedCertificate:
        """Encode and sign one certificate (RFC 5280 4.1: TBS, algorithm, signature)."""
        serial = new_serial() if serial is None else serial
        tbs, not_before, not_after = self._tbs(public_key, device_id, now, profile, serial, role)
        # The signature is a BIT STRING with no unused bits (RFC 5280 4.1.1.3).
        signature = der.encode(0x03, b"\x00" + self._sign(tbs))
        return SignedCertificate(
            der.encode(0x30, tbs + self._signature_algorithm + signature),
            serial,
            not_before,
            not_after,
        )


class BuilderCertificates:
    """The same interface on cryptography's builder: used when the template does not match."""

    def __init__(self, issuer: Issuer) -> None:
        self._issuer = issuer

    def issue(
        self,
        public_key: PublicKey,
        device_id: DeviceId,
        now: datetime,
        profile: DeviceProfile,
        role: Role = Role.DEVICE,
        serial: int | None = None,
    ) -> SignedCertificate:
        cert = build_device_certificate(
            public_key, device_id, self._issuer, now, profile, role=role, serial=serial
        )
        return signed_certificate(cert)


def signed_certificate(cert: x509.Certificate) -> SignedCertificate:
    return SignedCertificate(
        cert.public_bytes(Encoding.DER),
        cert.serial_number,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


def device_certificates(
    issuer: Issuer, on_mismatch: Callable[[TemplateMismatch], None] | None = None
) -> CertificateTemplate | BuilderCertificates:
    """The template for `issuer`, or the builder if the template cannot reproduce it (a
    cryptography release that encodes differently): slower, never different."""
    try:
        return CertificateTemplate(issuer)
    except TemplateMismatch as exc:
        if on_mismatch is not None:
            on_mismatch(exc)
        return BuilderCertificates(issuer)
