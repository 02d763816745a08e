"""The operator's home folder: where each CA file lives, how init creates and serve loads it."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.home.config import ServerConfig, load_config, render_config
from enroll_server.pki.ca import (
    Issuer,
    build_issuing_ca,
    build_root_ca,
    build_server_certificate,
    server_hostnames,
)
from enroll_server.pki.crl import RevokedEntryLike, build_crl, ca_certs_distribution_point
from enroll_server.pki.keys import (
    KeyType,
    PrivateKey,
    generate_key,
    private_key_pem,
)
from enroll_server.pki.root_rollover import is_self_signed, signed_by
from enroll_server.pki.signer import (
    Pkcs11Signer,
    Signer,
    module_path,
    parse_pkcs11_uri,
    read_pin,
    token_signer,
)
from enroll_server.registry.location import RegistryLocation, choose_location
from fleetpki.atomic_file import (
    PUBLIC_MODE,
    exchange_paths,
    fsync_dir,
    make_private_dir,
    write_atomic,
)

PASSPHRASE_ENV = "FLEETPKI_CA_PASSPHRASE"
# The TLS server certificate's lifetime: 397 days, the CA/Browser Forum's ceiling for TLS
# server certificates (BR 6.3.2), which clients that check it hold private CAs to as well.
SERVER_CERT_DAYS = 397
# The root's CRL when the root key is in the home: re-signed at half life by `fleetpki serve`.
# An offline root's CRL is signed at a ceremony for longer (home/root.py ROOT_CRL_DAYS).
ROOT_CRL_LIFETIME = timedelta(days=30)
HOME_ENV = "FLEETPKI_HOME"


class HomeError(Exception):
    """The home folder is missing, incomplete or already initialized."""

    def __init__(self, home: Path, why: str) -> None:
        super().__init__(f"{home}: {why}")
        self.home = home
        self.why = why


@dataclass(frozen=True, slots=True)
class HomeLayout:
    """Paths inside a home folder; nothing here touches the disk."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "fleetpki.toml"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def root_cert(self) -> Path:
        """The trust anchor handed to devices (bundle ca.pem) and relying parties."""
        return self.ca_dir / "root.pem"

    @property
    def root_key(self) -> Path:
        return self.ca_dir / "root.key"

    @property
    def issuing_cert(self) -> Path:
        return self.ca_dir / "issuing.pem"

    @property
    def issuing_key(self) -> Path:
        return self.ca_dir / "issuing.key"

    @property
    def issuing_csr(self) -> Path:
        """`init --external-root`: the request for the operator's PKI (home/external_root.py)."""
        return self.ca_dir / "issuing.csr"

    @property
    def intermediates(self) -> Path:
        """An external root: the operator's CAs between the root and our issuing CA, PEM."""
        return self.ca_dir / "intermediates.pem"

    @property
    def chain(self) -> Path:
        """issuing + intermediates + root, PEM: the CA file relying parties (brokers) load."""
        return self.ca_dir / "chain.pem"

    @property
    def root_update(self) -> Path:
        """A root rollover's certificates besides the new root (home/root_update.py): the
        old-signed-new and new-signed-old cross-certificates and the old root, PEM."""
        return self.ca_dir / "root-update.pem"

    @property
    def root_crl(self) -> Path:
        """The root CA's CRL, DER: served at /root.crl, the issuing CA's CDP."""
        return self.ca_dir / "root.crl"

    @property
    def passphrase_file(self) -> Path:
        return self.ca_dir / "passphrase"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def server_cert(self) -> Path:
        """Server certificate followed by the issuing CA (what a TLS server sends)."""
        return self.tls_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.tls_dir / "server.key"

    @property
    def registry(self) -> Path:
        return self.root / "registry.db"

    @property
    def admin_token(self) -> Path:
        return self.root / "admin.token"


def resolve_home(home: Path | None) -> Path:
    if home is not None:
        return home
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env)
    raise HomeError(Path("."), f"no home folder: pass --home or set {HOME_ENV}")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def read_intermediates(layout: HomeLayout) -> tuple[x509.Certificate, ...]:
    """The CAs between the operator's root and our issuing CA (none with a root of our own)."""
    if not layout.intermediates.exists():
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(layout.intermediates.read_bytes()))
    except (OSError, ValueError) as exc:
        raise HomeError(layout.root, f"{layout.intermediates} unreadable: {exc}") from exc


def read_root_update(layout: HomeLayout) -> tuple[x509.Certificate, ...]:
    """H/ca/root-update.pem (none before a root rollover): newest rollover first."""
    if not layout.root_update.exists():
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(layout.root_update.read_bytes()))
    except (OSError, ValueError) as exc:
        raise HomeError(layout.root, f"{layout.root_update} unreadable: {exc}") from exc


def cross_certificates_for(
    issuing: x509.Certificate, update: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """The cross-certificates of a root rollover that certify the key that signed `issuing`:
    under the new root, the old-signed-new one, which lets a device that still trusts only the
    old root verify a chain through the new (pki/root_rollover.py); under the old root, the
    new-signed-old one, for devices that trust only the new root."""
    found = []
    for cross in update:
        # Self-issued, the key that signed `issuing`, and not a root: a cross-certificate.
        if (
            cross.subject == cross.issuer
            and signed_by(issuing, cross)
            and not is_self_signed(cross)
        ):
            found.append(cross)
    return tuple(found)


def write_server_certificate(
    layout: HomeLayout,
    key: PrivateKey,
    cert: x509.Certificate,
    issuing: x509.Certificate,
    intermediates: tuple[x509.Certificate, ...],
) -> None:
    """The TLS key and the certificate with the CAs a TLS server sends after it (issuing,
    then any intermediates: RFC 8446 4.4.2, each certifying the one before; after a root
    rollover, the cross-certificate that links the issuing CA's root to the other root),
    both at once (_replace_server_pair)."""
    crosses = cross_certificates_for(issuing, read_root_update(layout))
    sent = b"".join(_pem(c) for c in (cert, issuing, *intermediates, *crosses))
    # The TLS key is not encrypted: servers must restart unattended; it is 0600 and can only
    # impersonate the server, not issue certificates.
    _replace_server_pair(layout, private_key_pem(key, None), sent)


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a high-entropy token: tokens are stored only this way (never in clear)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A 256-bit URL-safe random token."""
    return secrets.token_urlsafe(32)


def _passphrase(layout: HomeLayout, create: bool) -> bytes:
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if layout.passphrase_file.exists():
        return layout.passphrase_file.read_bytes().strip()
    if not create:
        raise HomeError(
            layout.root,
            f"CA keys are encrypted: set {PASSPHRASE_ENV} or restore {layout.passphrase_file}",
        )
    phrase = new_secret().encode()
    write_atomic(layout.passphrase_file, phrase + b"\n")
    return phrase


def home_passphrase(layout: HomeLayout) -> bytes:
    """The passphrase of the home's encrypted CA keys; HomeError if it is not to be had."""
    return _passphrase(layout, create=False)


@dataclass(frozen=True, slots=True)
class InitResult:
    layout: HomeLayout
    admin_token: str
    root_cert: x509.Certificate
    issuing_cert: x509.Certificate
    server_cert: x509.Certificate


def check_new_home(home: Path, *, force: bool) -> HomeLayout:
    """The layout of a home `init` may create: HomeError if one is there and not `force`."""
    layout = HomeLayout(home)
    if layout.config.exists() and not force:
        raise HomeError(home, "already initialized (fleetpki.toml exists); use --force to redo")
    return layout


def prepare_home(home: Path, *, force: bool) -> tuple[HomeLayout, bytes]:
    """`init`'s first step: the folders (0700) and the passphrase of the home's CA keys."""
    layout = check_new_home(home, force=force)
    make_private_dir(home)
    make_private_dir(layout.ca_dir)
    make_private_dir(layout.tls_dir)
    return layout, _passphrase(layout, create=True)


def finish_home(layout: HomeLayout, config: ServerConfig) -> str:
    """`init`'s last step: the admin token and fleetpki.toml (whose presence says "initialized")."""
    admin_token = new_secret()
    write_atomic(layout.admin_token, admin_token.encode() + b"\n")
    write_atomic(layout.config, render_config(config).encode(), 0o600)
    return admin_token


def init_home(
    home: Path,
    config: ServerConfig,
    now: datetime,
    *,
    force: bool = False,
    issuing_signer: Signer | None = None,
    root_signer: Signer | None = None,
    keep_root: Callable[[Issuer, x509.CertificateRevocationList], None] | None = None,
    root_crl_lifetime: timedelta = ROOT_CRL_LIFETIME,
) -> InitResult:
    """Create the CA hierarchy, the TLS server certificate, the config and the admin token.

    The registry is created by the caller (it owns SQL); this function only writes files.
    `issuing_signer`: the issuing CA key in a token (config.ca_key names it); no key file.
    `root_signer`: the root CA key in a token (config.root_key names it); no H/ca/root.key.
    `keep_root`: where the root key goes instead of H/ca/root.key (an offline root folder,
    home/root.py), called with the root and its first CRL before anything else is written.
    """
    check_new_home(home, force=force)
    root_key: PrivateKey | Signer = root_signer or generate_key(config.key_type)
    root_cert = build_root_ca(root_key, "fleetpki Root CA", now)
    root = Issuer(root_cert, root_key)
    first_root_crl = sign_root_crl(root, 1, now, root_crl_lifetime)
    if keep_root is not None:
        keep_root(root, first_root_crl)  # first: if DIR cannot take it, no home is begun
    layout, phrase = prepare_home(home, force=force)
    file_key: PrivateKey | None = None
    issuing_key: PrivateKey | Signer
    if issuing_signer is None:
        issuing_key = file_key = generate_key(config.key_type)
    else:
        issuing_key = issuing_signer
    issuing_cert = build_issuing_ca(
        issuing_key,
        root,
        "fleetpki Issuing CA",
        now,
        crl_url=config.urls().root_crl,
    )
    issuing = Issuer(issuing_cert, issuing_key, config.urls())
    server_key = generate_key(config.key_type)
    server_cert = build_server_certificate(
        server_key.public_key(),
        issuing,
        server_hostnames(list(config.hostnames)),
        now,
        SERVER_CERT_DAYS,
    )
    if keep_root is None and isinstance(root_key, PrivateKey):
        write_atomic(layout.root_key, private_key_pem(root_key, phrase))
    elif layout.root_key.exists():
        layout.root_key.unlink()  # a --force over a home whose root key was a file here
    if file_key is not None:
        write_atomic(layout.issuing_key, private_key_pem(file_key, phrase))
    elif layout.issuing_key.exists():
        layout.issuing_key.unlink()  # a --force over a home whose key was a file
    for stale in (layout.intermediates, layout.issuing_csr):
        stale.unlink(missing_ok=True)  # a --force over a home under an external root
    write_server_certificate(layout, server_key, server_cert, issuing_cert, ())
    write_atomic(layout.root_cert, _pem(root_cert), PUBLIC_MODE)
    write_atomic(layout.issuing_cert, _pem(issuing_cert), PUBLIC_MODE)
    write_atomic(layout.chain, _pem(issuing_cert) + _pem(root_cert), PUBLIC_MODE)
    write_root_crl(layout, first_root_crl)
    admin_token = finish_home(layout, config)
    return InitResult(layout, admin_token, root_cert, issuing_cert, server_cert)


def renew_server_certificate(
    layout: HomeLayout,
    issuer: Issuer,
    config: ServerConfig,
    now: datetime,
    days: int = SERVER_CERT_DAYS,
) -> x509.Certificate:
    """A new key and TLS server certificate for the configured host names, written in place.

    Both files change in one step (_replace_server_pair): killed at any moment, the home
    holds the old pair or the new one, never a key of one and the certificate of the other.
    Readers that load both while they change (a running server) must still check that they
    match (ServerCertificates does); `fleetpki serve` and `fleetpki broker` pick the new pair
    up without a restart.
    """
    key = generate_key(config.key_type)
    cert = build_server_certificate(
        key.public_key(), issuer, server_hostnames(list(config.hostnames)), now, days
    )
    write_server_certificate(layout, key, cert, issuer.cert, read_intermediates(layout))
    return cert


def _replace_server_pair(layout: HomeLayout, key_pem: bytes, chain_pem: bytes) -> None:
    """Write the new pair complete into H/.tls.next (with links to anything else in tls/),
    then swap that folder with tls/ in one renameat2(RENAME_EXCHANGE); the old pair, now in
    .tls.next, is removed. A leftover .tls.next (a run killed before or after the swap) is
    not read by anything and is removed by the next renewal. Where the file system cannot
    swap, the key and then the certificate are renamed into tls/ one by one."""
    staging = layout.root / ".tls.next"
    shutil.rmtree(staging, ignore_errors=True)
    make_private_dir(staging)
    pair = (layout.server_key.name, layout.server_cert.name)
    for entry in layout.tls_dir.iterdir():
        if entry.name in pair:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True)
        else:
            os.link(entry, staging / entry.name, follow_symlinks=False)
    write_atomic(staging / layout.server_key.name, key_pem)
    write_atomic(staging / layout.server_cert.name, chain_pem, PUBLIC_MODE)
    if not exchange_paths(staging, layout.tls_dir):
        for name in pair:
            os.replace(staging / name, layout.tls_dir / name)
        fsync_dir(layout.tls_dir)
    fsync_dir(layout.root)
    shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class LoadedHome:
    layout: HomeLayout
    config: ServerConfig
    root_cert: x509.Certificate
    issuer: Issuer
    registry: RegistryLocation
    # An external root: the operator's CAs between its root and our issuing CA.
    intermediates: tuple[x509.Certificate, ...] = ()


def registry_location(
    layout: HomeLayout, config: ServerConfig | None = None, *, flag: str | None = None
) -> RegistryLocation:
    """The home's registry: `--registry` (`flag`), else FLEETPKI_REGISTRY, else fleetpki.toml's
    `registry`, else H/registry.db. A PostgreSQL password comes from `registry_password_file`
    (relative to the home), PGPASSWORD or libpq's passfile, never from fleetpki.toml."""
    if config is None and layout.config.exists():
        config = load_config(layout.config)
    password_file = None
    if config is not None and config.registry_password_file:
        password_file = layout.root / config.registry_password_file
    return choose_location(
        layout.registry,
        flag=flag,
        configured=config.registry if config is not None else None,
        password_file=password_file,
    )


def load_home(home: Path) -> LoadedHome:
    """Load config and the issuing CA (decrypting its key) for `serve` and operator commands."""
    layout = HomeLayout(home)
    if not layout.config.exists():
        raise HomeError(home, "not initialized: run `fleetpki init --home` first")
    config = load_config(layout.config)
    if config.root == "external" and not layout.issuing_cert.exists():
        raise HomeError(
            home,
            "waiting for the issuing CA certificate: have your PKI sign "
            f"{layout.issuing_csr}, then run `fleetpki ca import-issuing CERT CHAIN`",
        )
    try:
        root_cert = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
        issuing_cert = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise HomeError(home, f"CA files unreadable: {exc}") from exc
    # issuers builds on this module: the key fleetpki.toml names (a token's or issuing.key).
    from enroll_server.home.issuers import current_key, issuer_urls

    key = current_key(layout, issuing_cert)
    config = load_config(layout.config)  # again: current_key may have finished a rollover
    return LoadedHome(
        layout,
        config,
        root_cert,
        Issuer(issuing_cert, key, issuer_urls(layout, config, issuing_cert)),
        registry_location(layout, config),
        read_intermediates(layout),
    )


# The curves `init --ca-key` / `--root-key` make a key on in a token (PKCS#11 EC key pairs).
TOKEN_CURVES = {KeyType.EC_P256: "secp256r1", KeyType.EC_P384: "secp384r1"}


def ca_token_signer(
    layout: HomeLayout,
    config: ServerConfig,
    pin_file: Path | None = None,
    *,
    create: bool = False,
    curve: str = "secp256r1",
) -> Pkcs11Signer:
    """The issuing CA key in its token (config.ca_key): token_key_signer's."""
    return token_key_signer(layout, config, config.ca_key, pin_file, create=create, curve=curve)


def token_key_signer(
    layout: HomeLayout,
    config: ServerConfig,
    key_uri: str,
    pin_file: Path | None = None,
    *,
    create: bool = False,
    curve: str = "secp256r1",
) -> Pkcs11Signer:
    """A CA key in its token (`key_uri`, RFC 7512): the module from the URI, fleetpki.toml or
    the environment, the PIN from `pin_file`, fleetpki.toml's pkcs11_pin_file (relative to
    the home) or $FLEETPKI_PKCS11_PIN. SignerError (BadKeyUri, SignerUnavailable) if unusable."""
    uri = parse_pkcs11_uri(key_uri)
    if pin_file is None and config.pkcs11_pin_file:
        pin_file = layout.root / config.pkcs11_pin_file
    pin = read_pin(pin_file)
    module = module_path(config.pkcs11_module, uri)
    return token_signer(module, uri, pin, create=create, curve=curve)


def sign_root_crl(
    root: Issuer,
    number: int,
    now: datetime,
    lifetime: timedelta,
    revoked: Sequence[RevokedEntryLike] = (),
) -> x509.CertificateRevocationList:
    """The root CA's CRL number `number`, valid for `lifetime` from `now`, listing `revoked`
    (issuing CAs; empty until one is revoked, for relying parties that check the whole chain).
    After init, home/root.py publish_root_crl carries the entries from one CRL to the next."""
    idp = ca_certs_distribution_point()
    return build_crl(root.cert, root.key, revoked, number, now, lifetime, idp)


def write_root_crl(layout: HomeLayout, crl: x509.CertificateRevocationList) -> None:
    """H/ca/root.crl, DER: what serve publishes at /root.crl."""
    write_atomic(layout.root_crl, crl.public_bytes(serialization.Encoding.DER), PUBLIC_MODE)
