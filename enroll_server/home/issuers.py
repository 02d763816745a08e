"""Several issuing CAs at once: the current one and those it rolled over from.

Files (all under H/ca/; nothing else moves):
- issuing.pem / issuing.key: the CURRENT issuing CA, which signs every new certificate.
- issuing.next: during a rollover in a PKCS#11 token only, the URI of the new key (roll_over).
- issuers/<id>.pem / <id>.key: previous issuing CAs still live (their certificates have not all
  expired): they keep signing their own CRL and OCSP answers, and relying parties trust them.
  A key in a PKCS#11 token stays there: issuers/<id>.uri names it (RFC 7512) instead of .key.
- retired/<id>.pem / <id>.crl: an issuer whose last certificate has expired (retire_expired);
  its key is deleted (a token key: its objects destroyed), its last CRL kept as a record.
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

from enroll_server.home.config import PkiUrls, ServerConfig, load_config, with_ca_key
from enroll_server.home.layout import (
    HomeError,
    HomeLayout,
    home_passphrase,
    read_intermediates,
    renew_server_certificate,
    token_key_signer,
)
from enroll_server.home.root_update import current_roots
from enroll_server.pki.ca import Issuer, build_issuing_ca
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import PrivateKey, generate_key, load_private_key_pem, private_key_pem
from enroll_server.pki.root_rollover import is_self_signed
from enroll_server.pki.signer import KeyNotFound, Pkcs11Signer, Signer, SignerError
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

    @property
    def next_key(self) -> Path:
        return self.layout.ca_dir / "issuing.next"

    def previous(self, kid: str) -> tuple[Path, Path]:
        return self.previous_dir / f"{kid}.pem", self.previous_dir / f"{kid}.key"

    def previous_uri(self, kid: str) -> Path:
        return self.previous_dir / f"{kid}.uri"


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


def previous_certificates(layout: HomeLayout, current: x509.Certificate) -> list[x509.Certificate]:
    """The previous issuing CAs still live, oldest first, without their keys. HomeError if
    one is unreadable."""
    files = IssuerFiles(layout)
    found: list[x509.Certificate] = []
    if not files.previous_dir.is_dir():
        return found
    current_id = key_id(current)
    for pem in sorted(files.previous_dir.glob("*.pem")):
        if pem.stem == current_id:
            continue
        try:
            found.append(x509.load_pem_x509_certificate(pem.read_bytes()))
        except (OSError, ValueError) as exc:
            raise HomeError(
                layout.root, f"previous issuing CA {pem.stem} unreadable: {exc}"
            ) from exc
    found.sort(key=lambda c: c.not_valid_before_utc)
    return found


def issuer_token_key(
    layout: HomeLayout, config: ServerConfig, uri: str, cert: x509.Certificate | None = None
) -> Pkcs11Signer:
    """The token key `uri` names (HomeError if it is not to be had), checked against `cert`."""
    try:
        signer = token_key_signer(layout, config, uri)
    except SignerError as exc:
        raise HomeError(layout.root, str(exc)) from None
    if cert is not None and signer.public_key() != cert.public_key():
        signer.close_session()
        raise HomeError(layout.root, f"{uri} is not the key of issuing CA {key_id(cert)}")
    return signer


def previous_key(
    layout: HomeLayout, config: ServerConfig, cert: x509.Certificate
) -> PrivateKey | Signer:
    """A previous issuing CA's key: issuers/<id>.uri's token key, else issuers/<id>.key."""
    files = IssuerFiles(layout)
    kid = key_id(cert)
    try:
        if files.previous_uri(kid).exists():
            uri = files.previous_uri(kid).read_text().strip()
            return issuer_token_key(layout, config, uri, cert)
        key_pem = files.previous(kid)[1].read_bytes()
    except OSError as exc:
        raise HomeError(layout.root, f"previous issuing CA {kid} key unreadable: {exc}") from exc
    return load_private_key_pem(key_pem, home_passphrase(layout), f"issuing CA key {kid}")


def previous_issuers(
    layout: HomeLayout, config: ServerConfig, current: x509.Certificate
) -> list[Issuer]:
    """The previous issuing CAs still live, oldest first, with their keys (to sign their CRL
    and OCSP answers). HomeError if one is unreadable."""
    return [
        Issuer(cert, previous_key(layout, config, cert), issuer_urls(layout, config, cert))
        for cert in previous_certificates(layout, current)
    ]


def current_key(layout: HomeLayout, cert: x509.Certificate) -> PrivateKey | Signer:
    """The key of the current issuing CA `cert`, as fleetpki.toml names it now (read again: a
    rollover may have changed it): [ca] key's token object, else H/ca/issuing.key.

    A rollover in a token cut short between issuing.pem and fleetpki.toml (roll_over) is
    finished here: issuing.next names the new certificate's key; fleetpki.toml is rewritten
    to name it. HomeError if no key matches `cert`."""
    config = load_config(layout.config)
    files = IssuerFiles(layout)
    pending = files.next_key.read_text().strip() if files.next_key.exists() else ""
    for uri in dict.fromkeys(u for u in (config.ca_key, pending) if u):
        signer = issuer_token_key(layout, config, uri)
        if signer.public_key() != cert.public_key():
            signer.close_session()
            continue
        if uri != config.ca_key:
            _name_ca_key(layout, uri)
        return signer
    if config.ca_key:
        raise HomeError(layout.root, f"{config.ca_key} is not the issuing CA certificate's key")
    try:
        key_pem = layout.issuing_key.read_bytes()
    except OSError as exc:
        raise HomeError(layout.root, f"issuing CA key unreadable: {exc}") from exc
    key = load_private_key_pem(key_pem, home_passphrase(layout), "issuing CA key")
    if key.public_key() != cert.public_key():
        raise HomeError(layout.root, "the issuing CA key does not match its certificate")
    return key


def _name_ca_key(layout: HomeLayout, uri: str) -> None:
    """fleetpki.toml's [ca] key = `uri`, then the issuing.key and issuing.next it replaces
    (a file key moved into a token has its copy in issuers/<id>.key)."""
    try:
        text = with_ca_key(layout.config.read_text(), uri)
    except ValueError as exc:
        raise HomeError(layout.root, f"{layout.config}: {exc}") from None
    write_atomic(layout.config, text.encode(), 0o600)
    layout.issuing_key.unlink(missing_ok=True)
    IssuerFiles(layout).next_key.unlink(missing_ok=True)


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
    new_key: Callable[[], Pkcs11Signer] | None = None,
) -> Rollover:
    """A new issuing CA (new key) under `root` becomes the current one; the old one moves to
    issuers/<id> and stays live (it signs its CRL and OCSP answers) until retire_expired.

    `new_key`: the new key made in a PKCS#11 token (`ca rollover --ca-key URI`, required when
    the current key is in one; a file-key home given one moves into the token). Otherwise a
    new key file. `backfill(old_id)` records the old issuer on the registry's certificates
    from before schema 9 (Registry.assign_issuer), before anything is moved. HomeError before
    anything is written if a check fails.

    Files are written so that a crash at any step leaves a working home:
    1. issuers/<old>.pem and its key (.key, or .uri naming the token object): the old pair
       stays current; a copy beside it is ignored (previous_issuers skips the current id).
    2. (token) issuing.next: the new key's URI. Crash: ignored, fleetpki.toml's key matches.
    3. the new key: issuing.key (file; a running serve checks key and certificate match and
       keeps the old pair until they do: load_current), or none (the token holds it).
    4. issuing.pem: the new certificate. Crash (token): fleetpki.toml still names the old key;
       current_key finds the new one in issuing.next and rewrites fleetpki.toml.
    5. (token) fleetpki.toml's [ca] key = the new URI, then issuing.next (and a moved file
       key's issuing.key) removed: the new pair is coherent.
    6. chain.pem, then server.pem under the new issuer (a crash before them leaves those two
       as they were, key file or token alike: the new issuer signs, brokers loading chain.pem
       do not yet trust its certificates; `fleetpki serve` still works with every file).
    """
    if root.cert.subject != current.cert.issuer:
        raise HomeError(layout.root, "the root given did not sign the current issuing CA")
    if isinstance(current.key, Pkcs11Signer) and new_key is None:
        raise HomeError(
            layout.root,
            f"the issuing CA key is in a PKCS#11 token ({current.key.uri}): pass --ca-key "
            "pkcs11:token=...;object=... naming a new object for the new issuing key",
        )
    if not isinstance(current.key, PrivateKey | Pkcs11Signer):
        raise HomeError(layout.root, "the issuing CA key is neither a file nor a token key")
    files = IssuerFiles(layout)
    phrase = home_passphrase(layout)
    old_id = key_id(current.cert)
    previous = previous_certificates(layout, current.cert)
    key: PrivateKey | Pkcs11Signer = generate_key(config.key_type) if new_key is None else new_key()
    if isinstance(key, Pkcs11Signer) and (
        key.public_key() == current.cert.public_key()
        or any(key.public_key() == c.public_key() for c in previous)
    ):
        key.close_session()
        raise HomeError(layout.root, f"{key.uri} is a live issuing CA's key: name a new object")
    backfill(old_id)
    make_private_dir(files.previous_dir)
    cert_path, key_path = files.previous(old_id)
    if isinstance(current.key, Pkcs11Signer):
        write_atomic(files.previous_uri(old_id), f"{current.key.uri}\n".encode(), PUBLIC_MODE)
    else:
        write_atomic(key_path, private_key_pem(current.key, phrase))
    write_atomic(cert_path, _pem(current.cert), PUBLIC_MODE)
    if first_issuer_id(layout) is None:
        write_atomic(files.first_issuer, old_id.encode() + b"\n", PUBLIC_MODE)
    new = build_issuing_ca(
        key,
        root,
        next_common_name(current.cert, previous),
        now,
        days,
        crl_url=config.urls().root_crl,
    )
    if isinstance(key, Pkcs11Signer):
        write_atomic(files.next_key, f"{key.uri}\n".encode(), PUBLIC_MODE)
        write_atomic(layout.issuing_cert, _pem(new), PUBLIC_MODE)
        _name_ca_key(layout, str(key.uri))
    else:
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
    live = previous_certificates(layout, current)
    retired: list[str] = []
    for cert in live:
        kid = key_id(cert)
        latest = last_expiry(kid)
        if (latest is not None and latest > now) and cert.not_valid_after_utc > now:
            continue
        make_private_dir(files.retired_dir)
        write_atomic(files.retired_dir / f"{kid}.pem", _pem(cert), PUBLIC_MODE)
        crl = crl_of(kid)
        if crl is not None:
            write_atomic(files.retired_dir / f"{kid}.crl", crl, PUBLIC_MODE)
        retired.append(kid)
    if retired:
        keep = [c for c in live if key_id(c) not in retired]
        write_chain(layout, current, keep)
        for cert in live:
            if key_id(cert) in retired:
                _delete_previous(layout, config, cert)
    return retired


def _delete_previous(layout: HomeLayout, config: ServerConfig, cert: x509.Certificate) -> None:
    """A previous issuer's key gone for good, after chain.pem dropped it: its key file, or
    its token objects (destroyed, then the .uri naming them), and its issuers/ certificate."""
    files = IssuerFiles(layout)
    kid = key_id(cert)
    if files.previous_uri(kid).exists():
        uri = files.previous_uri(kid).read_text().strip()
        try:
            key = token_key_signer(layout, config, uri)
            if key.public_key() != cert.public_key():
                key.close_session()
                raise HomeError(layout.root, f"{uri} is not the key of issuing CA {kid}")
            key.destroy()
        except KeyNotFound:
            pass  # destroyed already: a crash before the .uri file went
        except SignerError as exc:
            raise HomeError(layout.root, f"issuing CA {kid}: {exc}") from None
        files.previous_uri(kid).unlink()
    for path in files.previous(kid):
        path.unlink(missing_ok=True)


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
    live = previous_certificates(layout, current)
    target = next((c for c in live if key_id(c) == kid), None)
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
    write_chain(layout, current, [c for c in live if c is not target])
    _delete_previous(layout, config, target)
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
