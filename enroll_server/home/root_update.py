"""Root rollover in a home: a new root under the old one's name, the two cross-certificates,
and the files relying parties and devices read (README, "Root rollover").

What `fleetpki ca rollover-root` changes, in this order (a crash part way leaves a home that
still works with the old root):
- H/ca/root-update.pem: old-signed-new, new-signed-old, the old root (then any earlier
  rollover's), served in /cacerts after the new root (RFC 7030 4.1.3) and sent in server.pem
  (layout.cross_certificates_for);
- the new root's key: H/ca/root.key (online root, the home's passphrase), DIR2/root.key (an
  offline root: `--new-root DIR2`, the root passphrase) or a new key in a token (a root key
  in a token: `--new-root-key URI`, named in fleetpki.toml's [ca] root_key);
- H/ca/root.pem: the new root, the anchor new bundles carry; its first CRL in H/ca/root.crl;
- H/ca/chain.pem: the live issuing CAs and both roots (home/issuers.py write_chain);
- server.pem: the same certificate, now followed by the new-signed-old cross-certificate.
The issuing CA stays until `fleetpki ca rollover` makes one under the new root.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.home.config import ServerConfig, with_root_key
from enroll_server.home.layout import (
    ROOT_CRL_LIFETIME,
    HomeError,
    HomeLayout,
    home_passphrase,
    read_intermediates,
    read_root_update,
    write_server_certificate,
)
from enroll_server.home.root import (
    ROOT_CRL_DAYS,
    check_offline_folder,
    new_root_passphrase,
    publish_root_crl,
    write_offline_root,
)
from enroll_server.pki.ca import Issuer
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import PrivateKey, generate_key, load_private_key_pem, private_key_pem
from enroll_server.pki.root_rollover import RootKeyUpdate, roll_root
from enroll_server.pki.signer import Pkcs11Signer
from fleetpki.atomic_file import PUBLIC_MODE, write_atomic


def _pem(certs: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True, slots=True)
class RootRollover:
    update: RootKeyUpdate
    new_root_dir: Path | None  # where the new root key went (offline), None = the home


def current_roots(layout: HomeLayout) -> tuple[x509.Certificate, ...]:
    """What /cacerts carries after the issuing CAs: the root devices get as ca.pem (first),
    then a rollover's cross-certificates and old root. HomeError if a file is unreadable."""
    try:
        root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise HomeError(layout.root, f"root certificate unreadable: {exc}") from exc
    return (root, *read_root_update(layout))


class RootFiles:
    """current_roots as the files are now, parsed again only when one has changed (a running
    serve shows a rollover at the next /cacerts; the files are looked at with stat only)."""

    def __init__(self, layout: HomeLayout) -> None:
        self._layout = layout
        self._seen: tuple[object, ...] | None = None
        self._roots: tuple[x509.Certificate, ...] = ()

    def _stamp(self) -> tuple[object, ...]:
        stamps: list[object] = []
        for path in (self._layout.root_cert, self._layout.root_update):
            try:
                st = path.stat()
            except FileNotFoundError:
                stamps.append(None)
                continue
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def __call__(self) -> tuple[x509.Certificate, ...]:
        stamp = self._stamp()
        if stamp != self._seen:
            self._roots = current_roots(self._layout)
            self._seen = stamp
        return self._roots


def rollover_root(
    layout: HomeLayout,
    config: ServerConfig,
    old: Issuer,
    now: datetime,
    *,
    days: int = 3650,
    new_root_dir: Path | None = None,
    root_passphrase_file: Path | None = None,
    new_root_key: Callable[[], Pkcs11Signer] | None = None,
) -> RootRollover:
    """Make the new root and its cross-certificates and install them (module docstring).

    `old`: the current root with its key (home/root.py load_root_issuer). An offline root
    needs `new_root_dir` (a new, empty folder: the new root's only key copy) and its
    passphrase; an online one keeps the new key in the home; a root key in a token
    ([ca] root_key) needs `new_root_key`, a new key in a token, which fleetpki.toml then
    names. HomeError before anything is written if a check fails."""
    from enroll_server.home.issuers import write_chain  # it imports this module

    if config.root == "external":
        raise HomeError(
            layout.root,
            "the root is your own PKI's: roll it over there, then give the issuing CA "
            "certificate it signs to `fleetpki ca import-issuing`",
        )
    if days < 1:
        raise HomeError(layout.root, f"--days must be at least 1, got {days}")
    in_token = bool(config.root_key)
    if in_token and new_root_key is None:
        raise HomeError(
            layout.root,
            "the root key is in a token: pass --new-root-key pkcs11:token=...;object=... (a new "
            "object for the new root's key)",
        )
    if not in_token and new_root_key is not None:
        raise HomeError(
            layout.root, "--new-root-key is for a root key in a token (init --root-key)"
        )
    offline = not in_token and (config.root == "offline" or not layout.root_key.exists())
    if offline and new_root_dir is None:
        raise HomeError(
            layout.root,
            "the root is offline: pass --new-root DIR2 (a new folder on removable media) for "
            "the new root key",
        )
    if not offline and new_root_dir is not None:
        raise HomeError(layout.root, "--new-root is for an offline root; this home's is online")
    home_phrase = home_passphrase(layout)
    phrase = None
    if new_root_dir is not None:
        check_offline_folder(new_root_dir)
        phrase = new_root_passphrase(root_passphrase_file, new_root_dir, home_phrase)
    issuers = _live_issuers(layout, config)
    key = new_root_key() if new_root_key is not None else generate_key(config.key_type)
    if key.public_key() == old.cert.public_key():
        raise HomeError(layout.root, "--new-root-key is the current root's key: name a new one")
    update = roll_root(old, key, now, days)
    new = Issuer(update.new, key)
    earlier = read_root_update(layout)
    write_atomic(
        layout.root_update,
        _pem([update.old_with_new, update.new_with_old, update.old, *earlier]),
        PUBLIC_MODE,
    )
    if new_root_dir is not None:
        assert phrase is not None
        # Signed for as long as an offline root's (a ceremony away), numbered after the home's.
        crl = publish_root_crl(layout, new, now, timedelta(days=ROOT_CRL_DAYS))
        write_offline_root(new_root_dir, phrase, new, crl)
    elif isinstance(key, Pkcs11Signer):
        text = with_root_key(layout.config.read_text(), str(key.uri))
        write_atomic(layout.config, text.encode(), 0o600)
    else:
        write_atomic(layout.root_key, private_key_pem(key, home_phrase))
    write_atomic(layout.root_cert, _pem([update.new]), PUBLIC_MODE)
    if new_root_dir is None:
        publish_root_crl(layout, new, now, ROOT_CRL_LIFETIME)
    # chain.pem: the live issuing CAs, then both roots (current_roots: root.pem, then the
    # self-signed old root of root-update.pem), written by the one writer of chain.pem.
    write_chain(layout, *issuers)
    _resend_server_chain(layout)
    return RootRollover(update, new_root_dir)


def _live_issuers(
    layout: HomeLayout, config: ServerConfig
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The current and previous live issuing CAs: what chain.pem lists before the roots."""
    from enroll_server.home.issuers import previous_issuers  # it imports this module

    try:
        current = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise HomeError(layout.root, f"issuing CA unreadable: {exc}") from exc
    return current, [i.cert for i in previous_issuers(layout, config, current)]


def _resend_server_chain(layout: HomeLayout) -> None:
    """server.pem again, same certificate and key, with the cross-certificate after the
    issuing CA (layout.write_server_certificate picks it): a TLS client that trusts only the
    new root then verifies the server too. A running serve reloads it within seconds."""
    try:
        certs = x509.load_pem_x509_certificates(layout.server_cert.read_bytes())
        key = load_private_key_pem(layout.server_key.read_bytes(), None, "TLS server key")
    except (OSError, ValueError, PkiError) as exc:
        raise HomeError(layout.root, f"TLS server certificate unreadable: {exc}") from exc
    if len(certs) < 2 or not isinstance(key, PrivateKey):
        raise HomeError(layout.root, f"{layout.server_cert} holds no issuing CA after the leaf")
    write_server_certificate(layout, key, certs[0], certs[1], read_intermediates(layout))
