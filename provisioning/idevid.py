"""Factory birth certificates (IDevID, IEEE 802.1AR): issuing them. The check lives in
enroll_server.pki.birth_certificate (the service runs it); re-exported here."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll_server.pki.birth_certificate import BirthIdentity, check_birth_certificate
from enroll_server.pki.ca import CA_BACKDATE, authority_key_identifier
from enroll_server.pki.keys import PublicKey, signature_hash
from enroll_server.pki.profile import SIGNATURE_ONLY_KEY_USAGE
from enroll_server.pki.serial import new_serial
from fleetpki.identity import DeviceId
from provisioning.manufacturer import ManufacturerCa

__all__ = ["BirthIdentity", "build_birth_certificate", "check_birth_certificate"]


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
