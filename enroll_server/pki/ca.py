"""The CA hierarchy: an offline-style root, an online issuing CA and the TLS server certificate."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll_server.pki.errors import CsrRejected
from enroll_server.pki.keys import PrivateKey, PublicKey, key_type_of
from enroll_server.pki.serial import new_serial
from enroll_server.pki.signer import Signer, sign_x509

# Certificates are backdated a little so that a relying party whose clock lags (a Pi that has
# just synced, a broker in another zone) does not see them as "not yet valid".
CA_BACKDATE = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class PkiUrls:
    """Where relying parties find revocation data (RFC 5280 4.2.1.13, 4.2.2.1)."""

    crl: str
    ocsp: str
    ca_issuers: str
    # The root CA's CRL: the CRL Distribution Point of the issuing CA certificate.
    root_crl: str | None = None


@dataclass(frozen=True, slots=True)
class Issuer:
    """A CA certificate, its signing key and the URLs its certificates point to.

    `key` is a key in memory or any Signer (a key in a PKCS#11 token, pki/signer.py).
    """

    cert: x509.Certificate
    key: PrivateKey | Signer
    urls: PkiUrls | None = None


@dataclass(frozen=True, slots=True)
class CaHierarchy:
    root_cert: x509.Certificate
    root_key: PrivateKey
    issuing_cert: x509.Certificate
    issuing_key: PrivateKey
    server_cert: x509.Certificate
    server_key: PrivateKey


def _name(common_name: str, organization: str = "fleetpki") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    # RFC 5280 4.2.1.3: a CA signs certificates and CRLs; digitalSignature for OCSP responses.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def build_root_ca(
    key: PrivateKey | Signer,
    common_name: str,
    now: datetime,
    days: int = 3650,
    *,
    subject: x509.Name | None = None,
) -> x509.Certificate:
    """Self-signed root, pathLen 1: it may sign one level of CA (the issuing CA) and no more.
    `subject`: the whole name instead of one made of `common_name` (a root rollover keeps the
    old root's name, pki/root_rollover.py)."""
    name = subject or _name(common_name)
    pub = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(new_serial())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    )
    return sign_x509(builder, key)


def build_issuing_ca(
    key: PrivateKey | Signer,
    root: Issuer,
    common_name: str,
    now: datetime,
    days: int = 1825,
    crl_url: str | None = None,
) -> x509.Certificate:
    """The online CA that signs device and server certificates, pathLen 0 (RFC 5280 4.2.1.9).

    `crl_url`: where the root's CRL is published, as its CRL Distribution Point (RFC 5280
    4.2.1.13), so relying parties that check the whole chain (`openssl verify
    -crl_check_all`) find it.
    """
    return _issuing_ca(key.public_key(), _name(common_name), root, now, days, crl_url)


def _issuing_ca(
    pub: PublicKey,
    subject: x509.Name,
    root: Issuer,
    now: datetime,
    days: int,
    crl_url: str | None,
) -> x509.Certificate:
    not_after = min(now + timedelta(days=days), root.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.cert.subject)
        .public_key(pub)
        .serial_number(new_serial())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(_aki(root.cert), critical=False)
    )
    if crl_url is not None:
        builder = builder.add_extension(crl_distribution_points(crl_url), critical=False)
    return sign_x509(builder, root.key)


def issuing_ca_csr(key: PrivateKey | Signer, common_name: str) -> x509.CertificateSigningRequest:
    """A PKCS#10 request (RFC 2986) for an issuing CA certificate, for a root elsewhere (an
    offline root's ceremony, the operator's own PKI). It asks, as extensionRequest, for what
    the CA needs: CA:TRUE with pathLen 0 and keyCertSign + cRLSign (RFC 5280 4.2.1.9, 4.2.1.3).
    """
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
    )
    return sign_x509(builder, key)


def issuing_ca_from_csr(
    csr: x509.CertificateSigningRequest,
    root: Issuer,
    now: datetime,
    days: int = 1825,
    crl_url: str | None = None,
) -> x509.Certificate:
    """The root signs an issuing CA request (`issuing_ca_csr`): the request's subject and key,
    our issuing-CA profile (pathLen 0), whatever extensions the request asked for.
    CsrRejected if the request's self-signature does not verify (RFC 2986 3: proof of
    possession); UnsupportedKey if its key is not one we accept."""
    if not csr.is_signature_valid:
        raise CsrRejected("the request's signature does not verify with its own public key")
    key_type_of(csr.public_key())  # UnsupportedKey for any key we do not issue for
    pub = cast(PublicKey, csr.public_key())
    return _issuing_ca(pub, csr.subject, root, now, days, crl_url)


def ca_key_usage() -> x509.KeyUsage:
    """The KeyUsage of every CA certificate we make."""
    return _ca_key_usage()


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def crl_distribution_points(url: str) -> x509.CRLDistributionPoints:
    """One distribution point: the full-CRL URL `url` (RFC 5280 4.2.1.13)."""
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def authority_key_identifier(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """AKI for certificates and CRLs signed by `issuer_cert` (RFC 5280 4.2.1.1, 5.2.1)."""
    return _aki(issuer_cert)


def _san_entries(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hostnames:
        if host in seen:
            continue
        seen.add(host)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


# RFC 1123 2.1 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?\Z")


def check_hostname(value: str) -> str:
    """A server host name or IP address for the TLS certificate's SAN; ValueError if neither."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value):
            raise ValueError(
                f"{value!r} is neither an IP address nor a DNS host name "
                "(letters, digits and hyphens in dot-separated labels, RFC 1123)"
            ) from None
    return value


def server_hostnames(extra: Sequence[str]) -> list[str]:
    """localhost, 127.0.0.1 and ::1 always; then each operator-given --hostname.

    `localhost` is kept although pkilint flags a single-label dNSName
    (pkix.invalid_domain_name_syntax; RFC 5280 4.2.1.6 asks for RFC 1034 preferred name
    syntax, which one label does satisfy): clients on the server's own machine connect to
    https://localhost (curl, the simulator, `fleetpki demo`, agents in bundles made with the
    default public host), and TLS host name checking (RFC 6125 6.4) matches a name only
    against dNSName entries, never against the 127.0.0.1 / ::1 IP entries. No public CA can
    issue for it, so the name claims nothing beyond this machine.
    """
    return ["localhost", "127.0.0.1", "::1", *extra]


def build_server_certificate(
    public_key: PublicKey,
    issuer: Issuer,
    hostnames: Sequence[str],
    now: datetime,
    days: int = 397,
) -> x509.Certificate:
    """TLS server certificate for the EST service and the broker: serverAuth EKU only."""
    if not hostnames:
        raise ValueError("a server certificate needs at least one host name")
    not_after = min(now + timedelta(days=days), issuer.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0]))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key transport (TLS 1.2 RSA kx) needs keyEncipherment; EC/Ed25519 never do.
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hostnames)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer.cert), critical=False)
    )
    return sign_x509(builder, issuer.key)
