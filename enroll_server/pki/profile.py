"""End-entity certificate profiles: devices (clientAuth) and backend services (clientAuth)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from enroll_server.pki.ca import Issuer, authority_key_identifier, crl_distribution_points
from enroll_server.pki.keys import PublicKey
from enroll_server.pki.serial import new_serial
from enroll_server.pki.signer import sign_x509
from fleetpki.identity import SERVICE_URN_PREFIX, URN_PREFIX, DeviceId
from fleetpki.topics import Role


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """Validity rules of end-entity certificates.

    `backdate`: devices without a real-time clock boot with a clock that lags until NTP syncs;
    a notBefore a little in the past keeps a freshly issued certificate usable on them.
    """

    validity: timedelta = timedelta(days=30)
    backdate: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        if self.validity <= timedelta(0):
            raise ValueError(f"certificate validity must be positive, got {self.validity}")
        if self.backdate < timedelta(0):
            raise ValueError(f"backdate must not be negative, got {self.backdate}")


# RFC 5280 4.2.1.3: an end entity that only signs (TLS client auth, OCSP responses) needs
# digitalSignature and nothing else; shared by every end-entity profile we build.
SIGNATURE_ONLY_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def end_entity_uri(device_id: DeviceId, role: Role) -> str:
    """The SAN URI of a device or service certificate."""
    prefix = SERVICE_URN_PREFIX if role is Role.SERVICE else URN_PREFIX
    return prefix + device_id.value


def build_device_certificate(
    public_key: PublicKey,
    device_id: DeviceId,
    issuer: Issuer,
    now: datetime,
    profile: DeviceProfile,
    role: Role = Role.DEVICE,
    serial: int | None = None,
) -> x509.Certificate:
    """Build and sign the client certificate of one device (the profile of DESIGN.md).

    Nothing from the CSR but its public key is used: the subject, SAN and every extension come
    from the authenticated grant, so requested extensions are never copied (RFC 7030 4.2.1
    leaves this to CA policy).
    """
    not_after = now + profile.validity
    # RFC 5280 4.1.2.5: a certificate must not outlive its issuer.
    not_after = min(not_after, issuer.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id.value)]))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else new_serial())
        .not_valid_before(now - profile.backdate)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            SIGNATURE_ONLY_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        # RFC 5280 4.2.1.6: the subject DN is non-empty, so the SAN is not critical.
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(end_entity_uri(device_id, role))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(issuer.cert), critical=False)
    )
    if issuer.urls is not None:
        builder = builder.add_extension(
            crl_distribution_points(issuer.urls.crl), critical=False
        ).add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP,
                        x509.UniformResourceIdentifier(issuer.urls.ocsp),
                    ),
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier(issuer.urls.ca_issuers),
                    ),
                ]
            ),
            critical=False,
        )
    return sign_x509(builder, issuer.key)
