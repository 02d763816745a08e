"""Certificate revocation lists (RFC 5280 section 5): building them and knowing when to rebuild."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509

from enroll_server.pki.ca import authority_key_identifier
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import PrivateKey
from enroll_server.pki.signer import Signer, sign_x509

# thisUpdate is backdated a little: a relying party whose clock lags ours (a broker on another
# host, a Pi before NTP) would otherwise reject a fresh CRL as "not yet valid" and, with
# crlfile set, refuse every device it serves.
CRL_BACKDATE = timedelta(minutes=5)

# Reason names as RFC 5280 5.3.1 spells them; cryptography's ReasonFlags uses the same values.
_REASONS: dict[str, x509.ReasonFlags] = {flag.value: flag for flag in x509.ReasonFlags}


class RevokedEntryLike(Protocol):
    """One revoked certificate as the registry reports it (registry.models.RevokedEntry)."""

    @property
    def serial(self) -> int: ...

    @property
    def revoked_at(self) -> datetime: ...

    @property
    def reason(self) -> str: ...


class CrlError(PkiError):
    """Base of the errors raised while building a CRL."""


class UnknownRevocationReason(CrlError):
    """A reason name that is not an RFC 5280 5.3.1 CRLReason, or not allowed in a full CRL."""

    def __init__(self, serial: int, reason: str, why: str) -> None:
        super().__init__(f"certificate {serial:x}: revocation reason {reason!r} {why}")
        self.serial = serial
        self.reason = reason


class BadCrlParameter(CrlError):
    """A CRL number or lifetime outside what RFC 5280 allows."""

    def __init__(self, what: str, value: object, why: str) -> None:
        super().__init__(f"invalid {what} {value!r}: {why}")
        self.what = what
        self.value = value


def reason_flag(serial: int, reason: str) -> x509.ReasonFlags:
    """The ReasonFlags for an RFC 5280 reason name; raises UnknownRevocationReason."""
    flag = _REASONS.get(reason)
    if flag is None:
        raise UnknownRevocationReason(serial, reason, "is not an RFC 5280 5.3.1 reason")
    if flag is x509.ReasonFlags.remove_from_crl:
        # RFC 5280 5.3.1: removeFromCRL only appears in delta CRLs; we publish full CRLs only.
        raise UnknownRevocationReason(serial, reason, "is only meaningful in a delta CRL")
    return flag


def revoked_certificate(entry: RevokedEntryLike) -> x509.RevokedCertificate:
    """One CRL entry: serial, revocationDate and (unless unspecified) the reasonCode."""
    flag = reason_flag(entry.serial, entry.reason)
    builder = (
        x509.RevokedCertificateBuilder()
        .serial_number(entry.serial)
        .revocation_date(entry.revoked_at)
    )
    if flag is not x509.ReasonFlags.unspecified:
        # RFC 5280 5.3.1: "the reason code CRL entry extension SHOULD be absent instead of
        # using the unspecified (0) reasonCode value".
        builder = builder.add_extension(x509.CRLReason(flag), critical=False)
    return builder.build()


def issuing_distribution_point(idp_url: str) -> x509.IssuingDistributionPoint:
    """The IDP naming where this CRL is published (RFC 5280 5.2.5).

    The full name must equal the CRL Distribution Point of the certificates it covers, or
    scope-checking relying parties (OpenSSL, EMQX) will not use it for them. Our issuing CA has
    pathLen 0, so it only ever issues end-entity certificates: onlyContainsUserCerts is true.
    """
    return x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(idp_url)],
        relative_name=None,
        only_contains_user_certs=True,
        only_contains_ca_certs=False,
        only_some_reasons=None,
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )


def ca_certs_distribution_point() -> x509.IssuingDistributionPoint:
    """The IDP of the root CA's CRL (RFC 5280 5.2.5): CA certificates only (the root signs
    nothing else), and no distribution point name, so the CRL is in scope for every issuing
    CA the root signed, with a CRL Distribution Point (homes made by `fleetpki init` from
    2026-12-05 on) or without one (earlier homes): RFC 5280 6.3.3 (b)(2)(i) only compares
    names when the IDP has one."""
    return x509.IssuingDistributionPoint(
        full_name=None,
        relative_name=None,
        only_contains_user_certs=False,
        only_contains_ca_certs=True,
        only_some_reasons=None,
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )


def build_crl(
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey | Signer,
    entries: Sequence[RevokedEntryLike],
    crl_number: int,
    now: datetime,
    next_update: timedelta,
    idp_url: str | x509.IssuingDistributionPoint,
) -> x509.CertificateRevocationList:
    """Build and sign the full CRL of `issuer_cert` listing `entries`.

    Extensions: CRL number (5.2.3), authority key identifier (5.2.1), issuing distribution
    point (5.2.5, critical: `idp_url`'s, or the IDP given). The revoked entries are handed
    to the builder's constructor in one list: `add_revoked_certificate` copies the whole list
    on every call, which is quadratic (26 s at 100k entries against ~1.5 s this way).
    """
    # RFC 5280 5.2.3: CRLNumber is a non-negative integer of at most 20 octets.
    if not 0 <= crl_number < 2**159:
        raise BadCrlParameter("CRL number", crl_number, "must be in 0 .. 2**159 - 1")
    if next_update <= timedelta(0):
        raise BadCrlParameter("CRL lifetime", next_update, "must be positive")
    revoked = [revoked_certificate(entry) for entry in entries]
    idp = issuing_distribution_point(idp_url) if isinstance(idp_url, str) else idp_url
    extensions = [
        x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(crl_number)),
        x509.Extension(
            x509.AuthorityKeyIdentifier.oid, False, authority_key_identifier(issuer_cert)
        ),
        # RFC 5280 5.2.5: "this extension is critical".
        x509.Extension(x509.IssuingDistributionPoint.oid, True, idp),
    ]
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer_cert.subject,
        last_update=now - CRL_BACKDATE,
        next_update=now + next_update,
        extensions=extensions,
        revoked_certificates=revoked,
    )
    return sign_x509(builder, issuer_key)


def crl_lifetime(crl: x509.CertificateRevocationList) -> timedelta | None:
    """nextUpdate - thisUpdate, or None for a CRL without nextUpdate."""
    if crl.next_update_utc is None:
        return None
    return crl.next_update_utc - crl.last_update_utc


def crl_refresh_at(crl: x509.CertificateRevocationList) -> datetime:
    """When to replace `crl`: half way through its lifetime.

    Relying parties (mosquitto's crlfile, EMQX, OpenSSL) refuse every certificate once the
    CRL they hold is past nextUpdate, so a fresh one has to be out long before that; at half
    life, a publisher that misses a few refresh rounds still has hours to recover.
    """
    lifetime = crl_lifetime(crl)
    if lifetime is None:
        return crl.last_update_utc
    return crl.last_update_utc + lifetime / 2


def crl_needs_refresh(crl: x509.CertificateRevocationList, now: datetime) -> bool:
    """True once `crl` is half way to its nextUpdate (or has none, or is already past it)."""
    return now >= crl_refresh_at(crl)
