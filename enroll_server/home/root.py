"""The root CA's key and certificate: in the home (online root) or in an offline folder DIR."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.home.config import ConfigError, load_config
from enroll_server.home.layout import (
    ROOT_CRL_LIFETIME,
    HomeError,
    HomeLayout,
    home_passphrase,
    sign_root_crl,
    token_key_signer,
    write_root_crl,
)
from enroll_server.pki.ca import Issuer
from enroll_server.pki.crl import RevokedEntryLike, crl_needs_refresh
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import PrivateKey, PublicKey, load_private_key_pem, private_key_pem
from enroll_server.pki.signer import Pkcs11Signer, SignerError
from fleetpki.atomic_file import PUBLIC_MODE, make_private_dir, write_atomic

log = logging.getLogger("fleetpki.root")

# The offline root key's passphrase: never in the home (whoever holds the home would then hold
# the root), never on the command line (ps, shell history). The operator keeps it apart from
# DIR (a safe, a password manager) and hands it in at each ceremony by this variable or a file.
ROOT_PASSPHRASE_ENV = "FLEETPKI_ROOT_PASSPHRASE"
# A passphrase shorter than this is refused when the offline root is created.
MIN_ROOT_PASSPHRASE = 12
# An offline root's CRL is signed at a ceremony, so it must outlast the time between two:
# a year by default (`--root-crl-days`); serve warns from [ca] root_crl_warning before.
ROOT_CRL_DAYS = 365


@dataclass(frozen=True, slots=True)
class OfflineRoot:
    """Paths inside an offline root folder (removable media); nothing here touches the disk."""

    dir: Path

    @property
    def cert(self) -> Path:
        return self.dir / "root.pem"

    @property
    def key(self) -> Path:
        """The root key, PKCS#8 encrypted with the offline root passphrase."""
        return self.dir / "root.key"

    @property
    def crl(self) -> Path:
        """A copy of the last root CRL signed at a ceremony (the home serves its own copy)."""
        return self.dir / "root.crl"


def root_passphrase(passphrase_file: Path | None, where: Path) -> bytes:
    """The offline root passphrase: `passphrase_file`, else $FLEETPKI_ROOT_PASSPHRASE.

    HomeError (naming `where`, the folder being opened) when neither gives one.
    """
    if passphrase_file is not None:
        try:
            phrase = passphrase_file.read_bytes().strip()
        except OSError as exc:
            raise HomeError(where, f"root passphrase file unreadable: {exc}") from exc
        if not phrase:
            raise HomeError(where, f"root passphrase file {passphrase_file} is empty")
        return phrase
    env = os.environ.get(ROOT_PASSPHRASE_ENV)
    if env:
        return env.encode()
    raise HomeError(
        where,
        f"the offline root key is encrypted: set {ROOT_PASSPHRASE_ENV} "
        "or pass --root-passphrase-file FILE",
    )


def _load(cert_path: Path, key_path: Path, phrase: bytes, where: Path) -> Issuer:
    missing = [p for p in (cert_path, key_path) if not p.exists()]
    if missing:
        names = " and ".join(str(p) for p in missing)
        raise HomeError(where, f"no root CA here: {names} missing")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key_pem = key_path.read_bytes()
    except (OSError, ValueError) as exc:
        raise HomeError(where, f"root CA files unreadable: {exc}") from exc
    try:
        key = load_private_key_pem(key_pem, phrase, f"root CA key {key_path}")
    except PkiError as exc:
        raise HomeError(where, str(exc)) from None
    if key.public_key() != cert.public_key():
        raise HomeError(where, f"{key_path} is not the key of the certificate {cert_path}")
    return Issuer(cert, key)


def _who(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} (serial {cert.serial_number:x})"


def home_root_certificates(layout: HomeLayout) -> list[x509.Certificate]:
    """Every root certificate in H/ca/root.pem (more than one while a root rolls over)."""
    try:
        return x509.load_pem_x509_certificates(layout.root_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise HomeError(layout.root, f"root certificate unreadable: {exc}") from exc


def load_offline_root(root_dir: Path, passphrase_file: Path | None = None) -> Issuer:
    """The root CA from an offline folder (a ceremony machine needs no home)."""
    folder = OfflineRoot(root_dir)
    if not root_dir.is_dir():
        raise HomeError(root_dir, "offline root folder not found (is the medium mounted?)")
    phrase = root_passphrase(passphrase_file, root_dir)
    return _load(folder.cert, folder.key, phrase, root_dir)


def load_root_issuer(
    layout: HomeLayout | None, root_dir: Path | None, passphrase_file: Path | None = None
) -> Issuer:
    """The root CA certificate and key, for whatever needs the root to sign.

    `root_dir` None: the home's online root (H/ca/root.key, the home's passphrase).
    `root_dir` given: the offline root in DIR (the offline root passphrase); when `layout` is
    given too, DIR must hold a root of the home (the public key of one in H/ca/root.pem).
    HomeError naming what is missing or wrong.
    """
    if root_dir is not None:
        root = load_offline_root(root_dir, passphrase_file)
        if layout is not None and layout.root_cert.exists():
            home_roots = home_root_certificates(layout)
            if not any(c.public_key() == root.cert.public_key() for c in home_roots):
                theirs = ", ".join(_who(c) for c in home_roots)
                raise HomeError(
                    root_dir, f"holds the root {_who(root.cert)}, not the home's root {theirs}"
                )
        return root
    if layout is None:
        raise HomeError(Path("."), "no root CA: pass --home (online root) or --root DIR")
    uri = root_token_uri(layout)
    if uri:
        return _token_root(layout, uri)
    if not layout.root_key.exists():
        raise HomeError(
            layout.root,
            f"no root key in the home ({layout.root_key}): the root is offline or the "
            "operator's own; pass --root DIR (the offline root folder)",
        )
    return _load(layout.root_cert, layout.root_key, home_passphrase(layout), layout.root)


def root_token_uri(layout: HomeLayout) -> str:
    """fleetpki.toml's [ca] root_key: the root key's token (`init --root-key`), or ""."""
    if not layout.config.exists():
        return ""
    try:
        return load_config(layout.config).root_key
    except ConfigError as exc:
        raise HomeError(layout.root, str(exc)) from None


def _token_root(layout: HomeLayout, uri: str) -> Issuer:
    """The root whose key is in a token: the certificate of H/ca/root.pem with that key."""
    try:
        signer = token_key_signer(layout, load_config(layout.config), uri)
    except SignerError as exc:
        raise HomeError(layout.root, f"the root CA key {uri}: {exc}") from None
    for cert in home_root_certificates(layout):
        if cert.public_key() == signer.public_key():
            return Issuer(cert, signer)
    signer.close_session()
    raise HomeError(layout.root, f"{uri} is not the key of a root in {layout.root_cert}")


def new_root_passphrase(
    passphrase_file: Path | None, where: Path, home_phrase: bytes | None
) -> bytes:
    """The passphrase for a new offline root key: given (never made up and printed), at least
    MIN_ROOT_PASSPHRASE characters, and not the home's (the home must not open the root)."""
    phrase = root_passphrase(passphrase_file, where)
    if len(phrase) < MIN_ROOT_PASSPHRASE:
        raise HomeError(
            where, f"the root passphrase is {len(phrase)} characters; use {MIN_ROOT_PASSPHRASE}+"
        )
    if phrase == home_phrase:
        raise HomeError(where, "the root passphrase must differ from the home's CA passphrase")
    return phrase


def check_offline_folder(root_dir: Path) -> None:
    """`init --root-offline DIR`: DIR may be new or empty of a root, never overwritten."""
    folder = OfflineRoot(root_dir)
    if root_dir.exists() and not root_dir.is_dir():
        raise HomeError(root_dir, "is not a folder")
    if folder.key.exists() or folder.cert.exists():
        raise HomeError(root_dir, "already holds a root (root.key / root.pem): use another folder")


def write_offline_root(
    root_dir: Path, phrase: bytes, root: Issuer, crl: x509.CertificateRevocationList
) -> None:
    """DIR/root.key (encrypted with `phrase`), DIR/root.pem, DIR/root.crl."""
    check_offline_folder(root_dir)
    folder = OfflineRoot(root_dir)
    try:
        make_private_dir(root_dir)
        if not isinstance(root.key, PrivateKey):
            raise HomeError(root_dir, "an offline root is a key file, not a token key")
        write_atomic(folder.key, private_key_pem(root.key, phrase))
        write_atomic(folder.cert, root.cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
        write_atomic(folder.crl, crl.public_bytes(serialization.Encoding.DER), PUBLIC_MODE)
    except OSError as exc:
        raise HomeError(root_dir, f"cannot write the offline root: {exc}") from exc


def _read_crl(path: Path) -> x509.CertificateRevocationList | None:
    try:
        return x509.load_der_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    number: int = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return number


@dataclass(frozen=True, slots=True)
class RootCrlEntry:
    """A certificate the root revoked (an issuing CA): one entry of every root CRL after."""

    serial: int
    revoked_at: datetime
    reason: str


def _entries(crl: x509.CertificateRevocationList | None) -> list[RootCrlEntry]:
    """What `crl` revokes, to carry into the next one: the CRL file is the record."""
    if crl is None:
        return []
    out = []
    for revoked in crl:
        try:
            reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = x509.ReasonFlags.unspecified
        out.append(RootCrlEntry(revoked.serial_number, revoked.revocation_date_utc, reason.value))
    return out


def publish_root_crl(
    layout: HomeLayout | None,
    root: Issuer,
    now: datetime,
    lifetime: timedelta,
    *,
    root_dir: Path | None = None,
    revoke: Sequence[RevokedEntryLike] = (),
) -> x509.CertificateRevocationList:
    """The root's next CRL: numbered after the newest copy (H/ca/root.crl, DIR/root.crl),
    revoking what that copy revoked plus `revoke` (a compromised issuing CA), valid for
    `lifetime`; written to the home (`layout`) and to DIR (`root_dir`) when given. The one
    way a root CRL is signed after init (serve's half-life re-sign, `ca sign-root-crl`)."""
    copies = [layout.root_crl] if layout is not None else []
    copies += [OfflineRoot(root_dir).crl] if root_dir is not None else []
    newest = max((_read_crl(p) for p in copies), key=_crl_number, default=None)
    entries: dict[int, RevokedEntryLike] = {e.serial: e for e in _entries(newest)}
    entries.update({e.serial: e for e in revoke if e.serial not in entries})
    crl = sign_root_crl(root, _crl_number(newest) + 1, now, lifetime, list(entries.values()))
    if root_dir is not None:
        crl_der = crl.public_bytes(serialization.Encoding.DER)
        write_atomic(OfflineRoot(root_dir).crl, crl_der, PUBLIC_MODE)
    if layout is not None:
        write_root_crl(layout, crl)
    return crl


def root_crl(layout: HomeLayout, now: datetime) -> x509.CertificateRevocationList | None:
    """The root CA's CRL that serve publishes (`H/ca/root.crl`).

    Root key in the home (a file, or a token: [ca] root_key): signed anew when the file is
    missing (homes from before 2026-12-05), unreadable, or half way to its nextUpdate. A token
    that cannot sign (not plugged in, wrong PIN): the file as it is, with a warning, tried
    again at the next look; the CRL has the other half of its life for the token to come back.
    No root key (an offline root): the file as the last ceremony left it, even past its
    nextUpdate (serve warns), or None when there is none; this never needs nor looks for the key.
    """
    current = _read_crl(layout.root_crl)
    if current is not None and not crl_needs_refresh(current, now):
        return current
    uri = root_token_uri(layout)
    if not uri and not layout.root_key.exists():
        return current
    failed = _token_failed.get(layout.root)
    if uri and failed is not None and now < failed + TOKEN_RETRY:
        return current
    try:
        root = load_root_issuer(layout, None)
    except HomeError as exc:
        if not uri:
            raise
        return _unsigned(layout, current, exc.why, now)
    try:
        crl = publish_root_crl(layout, root, now, ROOT_CRL_LIFETIME)
    except SignerError as exc:  # the token went away between opening and signing
        return _unsigned(layout, current, str(exc), now)
    finally:
        if isinstance(root.key, Pkcs11Signer):
            root.key.close_session()
    _token_failed.pop(layout.root, None)
    return crl


# A root key in a token that could not sign: tried again (and logged again) after this long,
# not at every look at the file (serve's is every second).
TOKEN_RETRY = timedelta(minutes=1)
_token_failed: dict[Path, datetime] = {}


def _unsigned(
    layout: HomeLayout, current: x509.CertificateRevocationList | None, why: str, now: datetime
) -> x509.CertificateRevocationList | None:
    _token_failed[layout.root] = now
    kept = (
        "none to serve" if current is None else f"serving the last until {current.next_update_utc}"
    )
    log.warning("root CRL not re-signed: %s (%s; next try in %s)", why, kept, TOKEN_RETRY)
    return current


def sign_offline_root_crl(
    root_dir: Path,
    root: Issuer,
    now: datetime,
    days: int = ROOT_CRL_DAYS,
    layout: HomeLayout | None = None,
) -> x509.CertificateRevocationList:
    """A ceremony: the offline root signs its next CRL, valid `days`; kept in DIR/root.crl and,
    with a home at hand, in H/ca/root.crl (else the operator copies DIR/root.crl there with
    `fleetpki ca import-root-crl`)."""
    if days < 1:
        raise HomeError(root_dir, f"--days must be at least 1, got {days}")
    return publish_root_crl(layout, root, now, timedelta(days=days), root_dir=root_dir)


def import_root_crl(
    layout: HomeLayout, der: bytes, now: datetime
) -> x509.CertificateRevocationList:
    """`fleetpki ca import-root-crl F`: a CRL signed at a ceremony away from the home, checked
    (the home's root signed it, it is current, its number is not older) before it replaces
    H/ca/root.crl."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        try:
            crl = x509.load_pem_x509_crl(der)
        except ValueError as exc:
            raise HomeError(layout.root, f"not a CRL (DER or PEM): {exc}") from None
    if not any(
        crl.issuer == c.subject and crl.is_signature_valid(cast(PublicKey, c.public_key()))
        for c in home_root_certificates(layout)
    ):
        raise HomeError(layout.root, "that CRL was not signed by the home's root CA")
    if crl.next_update_utc is not None and crl.next_update_utc <= now:
        raise HomeError(layout.root, f"that CRL expired at {crl.next_update_utc.isoformat()}")
    current = _crl_number(_read_crl(layout.root_crl))
    if _crl_number(crl) < current:
        raise HomeError(
            layout.root, f"that CRL is number {_crl_number(crl)}, older than the home's {current}"
        )
    write_root_crl(layout, crl)
    return crl
