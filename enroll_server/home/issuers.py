"""Several issuing CAs at once: the current one and those it rolled over from.

Files (all under H/ca/; nothing else moves):
- issuing.pem / issuing.key: the CURRENT issuing CA, which signs every new certificate.
- issuers/<id>.pem / <id>.key: previous issuing CAs still live (their certificates have not all
  expired): they keep signing their own CRL and OCSP answers, and relying parties trust them.
- retired/<id>.pem / <id>.crl: an issuer whose last certificate has expired (retire_expired);
  its key is deleted, its last CRL kept as a record.
- revoked/<id>.pem / <id>.json: an issuer the root revoked (compromise, revoke_issuer); the root
  CRL lists it (revoked_issuer_entries).
- first-issuer: the id of the issuing CA whose certificates name /crl (the one `init` made);
  issuers made by `fleetpki ca rollover` name /crl/<id>. Absent: no rollover yet, the current
  issuer is the first.
<id> is the CA certificate's SubjectKeyIdentifier in lowercase hex (key_id), which is also the
AuthorityKeyIdentifier of every certificate it signs and the registry's issuer_key_id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.home.config import PkiUrls, ServerConfig
from enroll_server.home.layout import (
    HomeError,
    HomeLayout,
    home_passphrase,
    read_intermediates,
    renew_server_certificate,
)
from enroll_server.home.root_update import current_roots
from enroll_server.pki.ca import Issuer, build_issuing_ca
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import PrivateKey, generate_key, load_private_key_pem, private_key_pem
from enroll_server.pki.root_rollover import is_self_signed
from enroll_server.pki.signer import Signer
from enroll_server.registry.models import RevokedEntry
from fleetpki.atomic_file import PUBLIC_MODE, make_private_dir, write_atomic

# The CRL route of the first issuing CA (README's /crl); later ones add /<id>.
CRL_ROUTE = "crl"
CA_ISSUERS_ROUTE = "issuing-ca.der"


@dataclass(frozen=True, slots=True)
class IssuerFiles:
    """Paths of the previous, retired and revoked issuing CAs; nothing here touches the disk."""

    layout: HomeLayout

    @property
    def previous_dir(self) -> Path:
        return self.layout.ca_dir / "issuers"

    @property
    def retired_dir(self) -> Path:
        return self.layout.ca_dir / "retired"

    @property
    def revoked_dir(self) -> Path:
        return self.layout.ca_dir / REVOKED

    @property
    def first_issuer(self) -> Path:
        return self.layout.ca_dir / "first-issuer"

    def previous(self, kid: str) -> tuple[Path, Path]:
        return self.previous_dir / f"{kid}.pem", self.previous_dir / f"{kid}.key"


def first_issuer_id(layout: HomeLayout) -> str | None:
    try:
        return IssuerFiles(layout).first_issuer.read_text().strip() or None
    except OSError:
        return None


def crl_route(layout: HomeLayout, cert: x509.Certificate) -> str:
    """The path (no leading /) of an issuer's CRL: the one its certificates' CDP names."""
    first = first_issuer_id(layout)
    kid = key_id(cert)
    return CRL_ROUTE if first is None or first == kid else f"{CRL_ROUTE}/{kid}"


def ca_issuers_route(layout: HomeLayout, cert: x509.Certificate) -> str:
    """The path (no leading /) of an issuer's certificate, its certificates' AIA caIssuers."""
    first = first_issuer_id(layout)
    kid = key_id(cert)
    return CA_ISSUERS_ROUTE if first is None or first == kid else f"issuing-ca/{kid}.der"


def issuer_urls(layout: HomeLayout, config: ServerConfig, cert: x509.Certificate) -> PkiUrls:
    """The URLs an issuer's certificates carry: its own CRL (RFC 5280 4.2.1.13) and
    certificate (caIssuers, 4.2.2.1), the OCSP responder shared by all (the CertID names the
    issuer, RFC 6960 4.1.1)."""
    urls = config.urls()
    base = urls.crl.rsplit("/", 1)[0]
    return replace(
        urls,
        crl=f"{base}/{crl_route(layout, cert)}",
        ca_issuers=f"{base}/{ca_issuers_route(layout, cert)}",
    )


def previous_issuers(
    layout: HomeLayout, config: ServerConfig, current: x509.Certificate
) -> list[Issuer]:
    """The previous issuing CAs still live, oldest first, with their keys (to sign their CRL
    and OCSP answers). HomeError if one is unreadable."""
    files = IssuerFiles(layout)
    found: list[Issuer] = []
    if not files.previous_dir.is_dir():
        return found
    current_id = key_id(current)
    for pem in sorted(files.previous_dir.glob("*.pem")):
        kid = pem.stem
        if kid == current_id:
            continue
        try:
            cert = x509.load_pem_x509_certificate(pem.read_bytes())
            key_pem = files.previous(kid)[1].read_bytes()
        except (OSError, ValueError) as exc:
            raise HomeError(layout.root, f"previous issuing CA {kid} unreadable: {exc}") from exc
        key = load_private_key_pem(key_pem, home_passphrase(layout), f"issuing CA key {kid}")
        found.append(Issuer(cert, key, issuer_urls(layout, config, cert)))
    found.sort(key=lambda i: i.cert.not_valid_before_utc)
    return found


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_chain(
    layout: HomeLayout, current: x509.Certificate, previous: list[x509.Certificate]
) -> None:
    """H/ca/chain.pem: every live issuing CA (current first), the CAs between them and the root
    (an external root: H/ca/intermediates.pem), then the roots (H/ca/root.pem and, after a
    root rollover, the old root: an old issuing CA may be under it). What the brokers and the
    EST listener trust for client certificates: old and new certificates both verify."""
    between = read_intermediates(layout)
    roots = [c for c in current_roots(layout) if is_self_signed(c)]
    certs = [current, *previous, *between, *roots]
    write_atomic(layout.chain, b"".join(_pem(c) for c in certs), PUBLIC_MODE)


@dataclass(frozen=True, slots=True)
class Rollover:
    old: x509.Certificate
    new: x509.Certificate
    server_cert: x509.Certificate


def next_common_name(current: x509.Certificate, previous: list[x509.Certificate]) -> str:
    """A name no live issuer has: "<base> <n>". Agents and OpenSSL find a certificate's issuer
    by name first (RFC 5280 4.1.2.4), so two live issuers must not share one."""
    cns = [current.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value]
    cns += [c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value for c in previous]
    base = str(cns[0])
    head, _, tail = base.rpartition(" ")
    if head and tail.isdigit():
        base = head
    n = 2
    while f"{base} {n}" in cns:
        n += 1
    return f"{base} {n}"


def roll_over(
    layout: HomeLayout,
    config: ServerConfig,
    current: Issuer,
    root: Issuer,
    now: datetime,
    *,
    backfill: Callable[[str], object],
    days: int = 1825,
) -> Rollover:
    """A new issuing CA (new key) under `root` becomes the current one; the old one moves to
    issuers/<id> and stays live (it signs its CRL and OCSP answers) until retire_expired.

    `backfill(old_id)` records the old issuer on the registry's certificates from before
    schema 9 (Registry.assign_issuer), before anything is moved. Files are written so that a
    crash leaves a working home: the old issuer's copy first, the new key, then the new
    certificate (a running serve loads both and checks they match), chain.pem, server.pem.
    """
    if root.cert.subject != current.cert.issuer:
        raise HomeError(layout.root, "the root given did not sign the current issuing CA")
    if not isinstance(current.key, PrivateKey):
        raise HomeError(
            layout.root,
            f"the issuing CA key is in a PKCS#11 token ({config.ca_key}): `ca rollover` keeps "
            "issuing keys as files and cannot roll it over",
        )
    files = IssuerFiles(layout)
    phrase = home_passphrase(layout)
    old_id = key_id(current.cert)
    previous = [i.cert for i in previous_issuers(layout, config, current.cert)]
    backfill(old_id)
    make_private_dir(files.previous_dir)
    cert_path, key_path = files.previous(old_id)
    write_atomic(key_path, private_key_pem(current.key, phrase))
    write_atomic(cert_path, _pem(current.cert), PUBLIC_MODE)
    if first_issuer_id(layout) is None:
        write_atomic(files.first_issuer, old_id.encode() + b"\n", PUBLIC_MODE)
    key = generate_key(config.key_type)
    new = build_issuing_ca(
        key,
        root,
        next_common_name(current.cert, previous),
        now,
        days,
        crl_url=config.urls().root_crl,
    )
    write_atomic(layout.issuing_key, private_key_pem(key, phrase))
    write_atomic(layout.issuing_cert, _pem(new), PUBLIC_MODE)
    write_chain(layout, new, [*previous, current.cert])
    issuer = Issuer(new, key, issuer_urls(layout, config, new))
    server_cert = renew_server_certificate(layout, issuer, config, now)
    return Rollover(current.cert, new, server_cert)


def load_current(
    layout: HomeLayout,
    config: ServerConfig,
    key_of: Callable[[x509.Certificate], PrivateKey | Signer],
) -> Issuer:
    """The current issuing CA as the files are now; HomeError while its key and certificate
    do not match (a rollover half way through writing them)."""
    try:
        cert = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise HomeError(layout.root, f"issuing CA unreadable: {exc}") from exc
    key = key_of(cert)
    if key.public_key() != cert.public_key():
        raise HomeError(layout.root, "the issuing CA key does not match its certificate")
    return Issuer(cert, key, issuer_urls(layout, config, cert))


def retire_expired(
    layout: HomeLayout,
    config: ServerConfig,
    current: x509.Certificate,
    last_expiry: Callable[[str], datetime | None],
    crl_of: Callable[[str], bytes | None],
    now: datetime,
) -> list[str]:
    """Retire each previous issuer none of whose certificates is still valid at `now`
    (`last_expiry(id)`: the latest notAfter the registry holds for it, None for none), or that
    has itself expired: its certificate and last CRL (`crl_of(id)`, DER) go to retired/, its
    key is deleted, chain.pem no longer carries it. Returns the ids retired."""
    files = IssuerFiles(layout)
    live = previous_issuers(layout, config, current)
    retired: list[str] = []
    for issuer in live:
        kid = key_id(issuer.cert)
        latest = last_expiry(kid)
        if (latest is not None and latest > now) and issuer.cert.not_valid_after_utc > now:
            continue
        make_private_dir(files.retired_dir)
        write_atomic(files.retired_dir / f"{kid}.pem", _pem(issuer.cert), PUBLIC_MODE)
        crl = crl_of(kid)
        if crl is not None:
            write_atomic(files.retired_dir / f"{kid}.crl", crl, PUBLIC_MODE)
        retired.append(kid)
    if retired:
        keep = [i.cert for i in live if key_id(i.cert) not in retired]
        write_chain(layout, current, keep)
        for kid in retired:
            for path in files.previous(kid):
                path.unlink(missing_ok=True)
    return retired


REVOKED_REASON = "cACompromise"
REVOKED = "revoked"  # H/ca/revoked/: the issuing CAs the root revoked


def revoke_issuer(
    layout: HomeLayout,
    config: ServerConfig,
    current: x509.Certificate,
    kid: str,
    now: datetime,
) -> x509.Certificate:
    """Take a previous issuing CA out of service for good (its key is compromised): recorded in
    revoked/<id> for the root CRL (revoked_issuer_entry), dropped from chain.pem, its key
    deleted. The current issuer cannot be revoked: roll over first. HomeError otherwise."""
    files = IssuerFiles(layout)
    if kid == key_id(current):
        raise HomeError(
            layout.root,
            f"{kid} is the current issuing CA: run `fleetpki ca rollover` first, then revoke it",
        )
    live = previous_issuers(layout, config, current)
    target = next((i.cert for i in live if key_id(i.cert) == kid), None)
    if target is None:
        raise HomeError(layout.root, f"no live previous issuing CA {kid} (see H/ca/issuers/)")
    record = {
        "serial": f"{target.serial_number:x}",
        "revoked_at": now.isoformat(),
        "reason": REVOKED_REASON,
    }
    make_private_dir(files.revoked_dir)
    write_atomic(files.revoked_dir / f"{kid}.pem", _pem(target), PUBLIC_MODE)
    write_atomic(files.revoked_dir / f"{kid}.json", json.dumps(record).encode(), PUBLIC_MODE)
    write_chain(layout, current, [i.cert for i in live if i.cert is not target])
    for path in files.previous(kid):
        path.unlink(missing_ok=True)
    return target


def revoked_issuer_entry(layout: HomeLayout, kid: str) -> RevokedEntry:
    """The root CRL entry (RFC 5280 5.3) of an issuing CA revoke_issuer revoked; the root CRL
    carries it on from one CRL to the next (home.root.publish_root_crl)."""
    path = IssuerFiles(layout).revoked_dir / f"{kid}.json"
    try:
        record = json.loads(path.read_text())
        return RevokedEntry(
            serial=int(record["serial"], 16),
            revoked_at=datetime.fromisoformat(record["revoked_at"]),
            reason=str(record["reason"]),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise HomeError(layout.root, f"revoked issuer record {path} unreadable: {exc}") from exc
