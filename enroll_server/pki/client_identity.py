"""Who a client certificate is: the one identity check of EST re-enrollment and the broker.

Pure: the certificate, the registry's records of its serial and of its CN, and `now` in; a
`ClientIdentity` or an `IdentityRefusal` out. The callers look the records up (the service,
the broker's gate) and then apply the status rules (device state, certificate status).

The check matches the WHOLE certificate against the registry (SHA-256 over its DER, as the
service recorded it at issuance), never the serial alone: serials are public (OCSP, CRL), so
a certificate made elsewhere with a recorded serial and CN must not pass for ours. Where the
TLS layer trusts more than the fleet chain (the EST listener also trusts manufacturer CAs,
for IDevID bootstrap), `issued_by` checks the signature against our issuing CA as well.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetpki.identity import SERVICE_URN_PREFIX, URN_PREFIX
from fleetpki.topics import Role


class IdentityProblem(StrEnum):
    """Why a client certificate is not a fleet identity; the values are the broker's refusal
    metric labels (broker.policy.RefusalReason has each)."""

    NOT_YET_VALID = "cert_not_yet_valid"
    EXPIRED = "cert_expired"
    WRONG_USAGE = "cert_wrong_usage"
    UNKNOWN_IDENTITY = "unknown_device"
    IDENTITY_MISMATCH = "cert_identity_mismatch"
    UNKNOWN_CERTIFICATE = "cert_unknown"


@dataclass(frozen=True, slots=True)
class IdentityRefusal:
    """The certificate is refused: why (a label) and a sentence naming what did not match."""

    problem: IdentityProblem
    detail: str


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """A certificate the registry recorded, byte for byte, for a registered identity."""

    identity: str
    role: Role
    serial: int
    not_after: datetime


def fingerprint(der: bytes) -> str:
    """SHA-256 over the DER certificate, lowercase hex: the registry's fingerprint_sha256."""
    return hashlib.sha256(der).hexdigest()


def _text(value: object) -> str:
    """'active' from DeviceState.ACTIVE, 'dev1' from DeviceId('dev1'), a str unchanged."""
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else None


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _has_client_auth(cert: x509.Certificate) -> bool:
    # TLS verifies the chain for the "SSL client" purpose, which accepts a certificate
    # without any EKU; our profile always carries clientAuth, so demand it.
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku


def role_of(value: object) -> Role | None:
    """The Role of a registry role (an enum or its text); None for anything else."""
    try:
        return Role(_text(value))
    except ValueError:
        return None


def identity_uri(identity: str, role: Role) -> str:
    """The SAN URI a certificate of this identity carries (pki.profile writes it)."""
    return (SERVICE_URN_PREFIX if role is Role.SERVICE else URN_PREFIX) + identity


def check_client_certificate(
    cert: x509.Certificate,
    identity: object | None,
    record: object | None,
    now: datetime,
    *,
    fingerprint_sha256: str | None = None,
    cn: str | None = None,
) -> ClientIdentity | IdentityRefusal:
    """Whether `cert` is a certificate the registry holds for a registered identity, at `now`.

    `identity`: the registry record of the identity the certificate's CN names (anything with
    `device_id` and `role`: registry.models.Device), None if there is none; `record`: the
    registry record of the certificate's serial (`serial`, `device_id`, `fingerprint_sha256`:
    registry.models.CertificateRecord), None if there is none. `fingerprint_sha256`: SHA-256
    hex of the DER the client presented, when the caller has the DER (cheaper than
    re-encoding); computed from `cert` otherwise. `cn`: the certificate's CN, when the caller
    has read it already (the broker compares it with the client id first).
    """
    if cn is None:
        cn = common_name(cert)
    # RFC 5280 4.1.2.5: the validity period is inclusive at both ends.
    if now < cert.not_valid_before_utc:
        return IdentityRefusal(
            IdentityProblem.NOT_YET_VALID,
            f"certificate of {cn} is valid from {cert.not_valid_before_utc.isoformat()}",
        )
    if now > cert.not_valid_after_utc:
        return IdentityRefusal(
            IdentityProblem.EXPIRED,
            f"certificate of {cn} expired at {cert.not_valid_after_utc.isoformat()}",
        )
    if not _has_client_auth(cert):
        return IdentityRefusal(
            IdentityProblem.WRONG_USAGE,
            f"certificate of {cn} lacks the clientAuth extended key usage",
        )
    if cn is None or identity is None or _text(getattr(identity, "device_id", None)) != cn:
        return IdentityRefusal(
            IdentityProblem.UNKNOWN_IDENTITY, f"{cn} is not a registered identity"
        )
    role = role_of(getattr(identity, "role", None))
    expected_uri = identity_uri(cn, role or Role.DEVICE)
    if role is None or expected_uri not in _san_uris(cert):
        return IdentityRefusal(
            IdentityProblem.IDENTITY_MISMATCH,
            f"certificate of {cn} does not name {expected_uri} (registry role {role})",
        )
    serial = cert.serial_number
    if record is None or getattr(record, "serial", None) != serial:
        return IdentityRefusal(
            IdentityProblem.UNKNOWN_CERTIFICATE,
            f"certificate serial {serial:x} is not in the registry",
        )
    holder = _text(getattr(record, "device_id", None))
    if holder != cn:
        return IdentityRefusal(
            IdentityProblem.IDENTITY_MISMATCH,
            f"certificate serial {serial:x} belongs to {holder}",
        )
    if fingerprint_sha256 is None:
        fingerprint_sha256 = fingerprint(cert.public_bytes(serialization.Encoding.DER))
    recorded = str(getattr(record, "fingerprint_sha256", ""))
    if not hmac.compare_digest(fingerprint_sha256.encode(), recorded.encode()):
        # Same serial and CN, other bytes: not the certificate we issued (another CA's, or
        # altered). Serials are public, so a serial match alone proves nothing.
        return IdentityRefusal(
            IdentityProblem.UNKNOWN_CERTIFICATE,
            f"certificate serial {serial:x} of {cn} is not the certificate the registry "
            "recorded (fingerprint differs)",
        )
    return ClientIdentity(cn, role, serial, cert.not_valid_after_utc)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert` (names chain and the signature verifies: RFC 5280 6.1.3
    (a)(1), (a)(4)); cryptography's check, ~80 us for P-256."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
