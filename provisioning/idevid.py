"""Factory birth certificates (IDevID, IEEE 802.1AR): issuing them and checking them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll_server.pki.ca import CA_BACKDATE, authority_key_identifier
from enroll_server.pki.keys import PublicKey, signature_hash
from enroll_server.pki.profile import SIGNATURE_ONLY_KEY_USAGE
from enroll_server.pki.serial import new_serial
from fleetpki.identity import DeviceId, InvalidIdentifier
from provisioning.errors import BirthCertificateRejected
from provisioning.manufacturer import ManufacturerCa


@dataclass(frozen=True, slots=True)
class BirthIdentity:
    """Who a verified birth certificate speaks for: a device of one lot (batch)."""

    device_id: DeviceId
    lot: str
    manufacturer: x509.Certificate


def build_birth_certificate(
    public_key: PublicKey, device_id: DeviceId, lot: str, ca: ManufacturerCa, now: datetime
) -> x509.Certificate:
    """The IDevID of one device: subject serialNumber = CN = device id, OU = lot (batch id).

    802.1AR 8.6 puts the device serial in the subject serialNumber attribute; the CN repeats it
    because TLS-level tooling (and our CSR policy) looks at the CN. The lot in OU binds the
    certificate to the batch it was made for: revoking the batch kills it.
    """
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, lot),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id.value),
            x509.NameAttribute(NameOID.COMMON_NAME, device_id.value),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(now - CA_BACKDATE)
        # 802.1AR 8.5: an IDevID lives as long as the device; here as long as its CA.
        .not_valid_after(ca.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            SIGNATURE_ONLY_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_id.urn)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(ca.cert), critical=False)
        .sign(ca.key, signature_hash(ca.key))
    )


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
