"""The root CA's key and certificate: in the home (online root) or in an offline folder DIR."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from enroll_server.home.layout import HomeError, HomeLayout, home_passphrase
from enroll_server.pki.ca import Issuer
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import load_private_key_pem

# The offline root key's passphrase: never in the home (whoever holds the home would then hold
# the root), never on the command line (ps, shell history). The operator keeps it apart from
# DIR (a safe, a password manager) and hands it in at each ceremony by this variable or a file.
ROOT_PASSPHRASE_ENV = "FLEETPKI_ROOT_PASSPHRASE"
# A passphrase shorter than this is refused when the offline root is created.
MIN_ROOT_PASSPHRASE = 12


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
    given too, DIR must hold the home's root (same public key as H/ca/root.pem).
    HomeError naming what is missing or wrong.
    """
    if root_dir is not None:
        root = load_offline_root(root_dir, passphrase_file)
        if layout is not None and layout.root_cert.exists():
            try:
                home_root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
            except (OSError, ValueError) as exc:
                raise HomeError(layout.root, f"root certificate unreadable: {exc}") from exc
            if home_root.public_key() != root.cert.public_key():
                raise HomeError(
                    root_dir,
                    f"holds the root {root.cert.subject.rfc4514_string()} "
                    f"(serial {root.cert.serial_number:x}), not the home's root "
                    f"{home_root.subject.rfc4514_string()} (serial {home_root.serial_number:x})",
                )
        return root
    if layout is None:
        raise HomeError(Path("."), "no root CA: pass --home (online root) or --root DIR")
    if not layout.root_key.exists():
        raise HomeError(
            layout.root,
            f"no root key in the home ({layout.root_key}): the root is offline or the "
            "operator's own; pass --root DIR (the offline root folder)",
        )
    return _load(layout.root_cert, layout.root_key, home_passphrase(layout), layout.root)
