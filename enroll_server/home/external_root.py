"""A home under the operator's own root: init makes the issuing CA key and its request, and
`fleetpki ca import-issuing` completes the home with the certificate the operator's PKI signed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.home.config import ServerConfig, load_config
from enroll_server.home.layout import (
    SERVER_CERT_DAYS,
    HomeError,
    HomeLayout,
    ca_token_signer,
    finish_home,
    home_passphrase,
    prepare_home,
    write_server_certificate,
)
from enroll_server.pki.ca import (
    Issuer,
    build_server_certificate,
    issuing_ca_csr,
    server_hostnames,
)
from enroll_server.pki.issuing_import import (
    IssuingChain,
    check_issuing_certificate,
    probe_device_path,
)
from enroll_server.pki.keys import (
    PrivateKey,
    PublicKey,
    generate_key,
    load_private_key_pem,
    private_key_pem,
)
from enroll_server.pki.signer import Signer, SignerError
from fleetpki.atomic_file import PUBLIC_MODE, write_atomic

ISSUING_CA_NAME = "fleetpki Issuing CA"


@dataclass(frozen=True, slots=True)
class PendingHome:
    """`init --external-root` done: the request waits for the operator's PKI."""

    layout: HomeLayout
    admin_token: str
    csr: x509.CertificateSigningRequest


def init_external_home(
    home: Path,
    config: ServerConfig,
    *,
    force: bool = False,
    issuing_signer: Signer | None = None,
) -> PendingHome:
    """The issuing CA key (a file encrypted as the home's keys are, or `issuing_signer`'s
    token key) and its request H/ca/issuing.csr; no root, no certificates yet. The home is
    "waiting for the issuing CA certificate" until `import_issuing` (serve refuses to start)."""
    layout, phrase = prepare_home(home, force=force)
    config = replace(config, root="external")
    key: PrivateKey | Signer = issuing_signer or generate_key(config.key_type)
    csr = issuing_ca_csr(key, ISSUING_CA_NAME)
    stale = [layout.root_key, layout.root_cert, layout.root_crl, layout.issuing_cert]
    stale += [layout.chain, layout.intermediates, layout.server_cert, layout.server_key]
    for path in stale:  # a --force over an earlier home
        path.unlink(missing_ok=True)
    if isinstance(key, PrivateKey):
        write_atomic(layout.issuing_key, private_key_pem(key, phrase))
    else:
        layout.issuing_key.unlink(missing_ok=True)
    write_atomic(layout.issuing_csr, csr.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return PendingHome(layout, finish_home(layout, config), csr)


@dataclass(frozen=True, slots=True)
class ImportedIssuing:
    chain: IssuingChain
    server_cert: x509.Certificate


def _pending_key(layout: HomeLayout, config: ServerConfig) -> PrivateKey | Signer:
    if config.ca_key:
        try:
            return ca_token_signer(layout, config)
        except SignerError as exc:
            raise HomeError(layout.root, str(exc)) from None
    try:
        pem = layout.issuing_key.read_bytes()
    except OSError as exc:
        raise HomeError(layout.root, f"the issuing CA key is unreadable: {exc}") from exc
    return load_private_key_pem(pem, home_passphrase(layout), "issuing CA key")


def _certificates(data: bytes, what: str, where: Path) -> list[x509.Certificate]:
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError:
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise HomeError(where, f"{what} holds no certificate (PEM or DER)") from None


def import_issuing(
    layout: HomeLayout, cert_data: bytes, chain_data: bytes | None, now: datetime
) -> ImportedIssuing:
    """Complete a home made by `init --external-root` with the certificate the operator's PKI
    issued for H/ca/issuing.csr (`cert_data`: it, maybe followed by its chain; `chain_data`:
    the CAs above it up to the operator's self-signed root).

    Every check (pki/issuing_import.py) passes before anything is written; then the TLS server
    certificate, root.pem (the operator's root: the devices' trust anchor), intermediates.pem,
    chain.pem (issuing + intermediates + root) and, last, issuing.pem. IssuingRejected or
    HomeError otherwise, and the home is as it was.
    """
    config = load_config(layout.config)
    if config.root != "external":
        raise HomeError(
            layout.root,
            f"its root is {config.root!r}, not the operator's: import-issuing completes "
            "`fleetpki init --external-root`; a new issuing CA under this root is "
            "`fleetpki ca rollover`",
        )
    if layout.issuing_cert.exists():
        raise HomeError(
            layout.root,
            f"already has its issuing CA certificate ({layout.issuing_cert}); a new one is "
            "`fleetpki ca rollover`",
        )
    certs = _certificates(cert_data, "CERT", layout.root)
    chain = certs[1:] + (_certificates(chain_data, "CHAIN", layout.root) if chain_data else [])
    key = _pending_key(layout, config)
    pub: PublicKey = key.public_key()
    checked = check_issuing_certificate(certs[0], chain, pub, now)
    issuer = Issuer(checked.issuing, key, config.urls())
    probe_device_path(checked, issuer, now)
    server_key = generate_key(config.key_type)
    server_cert = build_server_certificate(
        server_key.public_key(),
        issuer,
        server_hostnames(list(config.hostnames)),
        now,
        SERVER_CERT_DAYS,
    )
    pem = serialization.Encoding.PEM
    write_server_certificate(
        layout, server_key, server_cert, checked.issuing, checked.intermediates
    )
    write_atomic(layout.root_cert, checked.root.public_bytes(pem), PUBLIC_MODE)
    if checked.intermediates:
        data = b"".join(c.public_bytes(pem) for c in checked.intermediates)
        write_atomic(layout.intermediates, data, PUBLIC_MODE)
    write_atomic(layout.chain, checked.pem(), PUBLIC_MODE)
    # Last: its presence ends the "waiting for the issuing CA certificate" state.
    write_atomic(layout.issuing_cert, checked.issuing.public_bytes(pem), PUBLIC_MODE)
    return ImportedIssuing(checked, server_cert)
