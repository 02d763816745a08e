"""Root rollover certificates: the new root and the two cross-certificates (RFC 4210 4.4).

RFC 4210 4.4 names the four certificates of a root key update: OldWithOld (the old root),
NewWithNew (the new root), OldWithNew (the new root's key certified by the old key) and
NewWithOld (the old root's key certified by the new key); RFC 7030 4.1.3 asks /cacerts to
carry them. The new root keeps the old root's name, so both cross-certificates are
self-issued (subject = issuer name): RFC 5280 6.1.4 (h)/(l) do not count a self-issued
certificate against pathLenConstraint, and the old root's pathLen 1 still allows the path
device -> issuing CA (new) -> OldWithNew -> old root that a device trusting only the old root
builds. Relying parties tell the two same-named roots apart by key identifiers (SKI/AKI).

Pure: keys and certificates in, certificates out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from enroll_server.pki.ca import (
    CA_BACKDATE,
    Issuer,
    authority_key_identifier,
    build_root_ca,
    ca_key_usage,
)
from enroll_server.pki.keys import PrivateKey
from enroll_server.pki.serial import new_serial
from enroll_server.pki.signer import Signer, sign_x509


def signed_by(cert: x509.Certificate, parent: x509.Certificate) -> bool:
    """`parent`'s name is `cert`'s issuer and `parent`'s key verifies `cert`'s signature."""
    try:
        cert.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    """A root. A rollover's cross-certificate has a root's name as both subject and issuer
    (self-issued) but the other root's signature."""
    return signed_by(cert, cert)


@dataclass(frozen=True)
class RootKeyUpdate:
    """The RFC 4210 4.4 set for one rollover: old root, new root and both cross-certificates."""

    old: x509.Certificate  # OldWithOld
    new: x509.Certificate  # NewWithNew
    old_with_new: x509.Certificate  # the new root's key, signed by the old root
    new_with_old: x509.Certificate  # the old root's key, signed by the new root

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        """All four, newest first: what /cacerts and the relying parties' CA files carry."""
        return (self.new, self.old_with_new, self.new_with_old, self.old)


def cross_certificate(subject: x509.Certificate, issuer: Issuer, now: datetime) -> x509.Certificate:
    """`subject`'s name, key and CA constraints, certified by `issuer` (another root), valid
    from now (backdated like every CA certificate) until the earlier of the two roots ends."""
    pub = subject.public_key()
    constraints = subject.extensions.get_extension_for_class(x509.BasicConstraints).value
    not_after = min(subject.not_valid_after_utc, issuer.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject.subject)
        .issuer_name(issuer.cert.subject)
        .public_key(pub)
        .serial_number(new_serial())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(constraints, critical=True)
        .add_extension(ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(authority_key_identifier(issuer.cert), critical=False)
    )
    return sign_x509(builder, issuer.key)


def roll_root(
    old: Issuer, new_key: PrivateKey | Signer, now: datetime, days: int = 3650
) -> RootKeyUpdate:
    """A new root under the old root's name with `new_key`, and the two cross-certificates.

    The new root's notBefore is later than the old one's, even a second after it was made:
    agents take only a root newer than their anchors (device_agent/anchors.py), so that a
    device holding the new root never adopts the old one back through new-signed-old."""
    earliest = old.cert.not_valid_before_utc + CA_BACKDATE + timedelta(seconds=1)
    new_cert = build_root_ca(new_key, "", max(now, earliest), days, subject=old.cert.subject)
    new = Issuer(new_cert, new_key)
    return RootKeyUpdate(
        old=old.cert,
        new=new_cert,
        old_with_new=cross_certificate(new_cert, old, now),
        new_with_old=cross_certificate(old.cert, new, now),
    )
