"""Factory birth certificates (IDevID, IEEE 802.1AR): the pure check of one against the
manufacturer CAs (provisioning.idevid issues them; the service checks them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll_server.pki.errors import BirthCertificateRejected
from fleetpki.identity import DeviceId, InvalidIdentifier


@dataclass(frozen=True, slots=True)
class BirthIdentity:
    """Who a verified birth certificate speaks for: a device of one lot (batch), and the
    manufacturer CA that signed it."""

    device_id: DeviceId
    lot: str
    manufacturer: x509.Certificate


def _one(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise BirthCertificateRejected(f"birth certificate must carry exactly one {what}")
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _issuer_of(cert: x509.Certificate, trusted: Sequence[x509.Certificate]) -> x509.Certificate:
    for ca in trusted:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    raise BirthCertificateRejected("client certificate was not issued by a manufacturer CA")


def check_birth_certificate(
    cert: x509.Certificate, trusted: Sequence[x509.Certificate], now: datetime
) -> BirthIdentity:
    """Verify a birth certificate against the manufacturer CAs; pure (the registry decides
    afterwards whether the device and its lot may enroll).

    TLS already proved the client holds the key; this re-checks the signature against the
    manufacturer CAs only, so a fleet (operational) certificate can never pass as an IDevID.
    """
    ca = _issuer_of(cert, trusted)
    for c in (cert, ca):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise BirthCertificateRejected(
                "birth certificate or its CA is expired or not yet valid"
            )
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            raise BirthCertificateRejected("a CA certificate is not a birth certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise BirthCertificateRejected("birth certificate lacks clientAuth extended key usage")
    except x509.ExtensionNotFound:
        pass  # 802.1AR does not require an EKU; absent means any use
    cn = _one(cert.subject, NameOID.COMMON_NAME, "CN")
    serial = _one(cert.subject, NameOID.SERIAL_NUMBER, "serialNumber")
    lot = _one(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU (lot)")
    if cn != serial:
        raise BirthCertificateRejected("birth certificate CN and serialNumber differ")
    try:
        device_id = DeviceId.parse(cn)
    except InvalidIdentifier as exc:
        raise BirthCertificateRejected(f"birth certificate names {exc.why}") from None
    return BirthIdentity(device_id, lot, ca)
