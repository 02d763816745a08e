"""Manufacturer CAs: the separate roots that sign factory birth certificates (IDevIDs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from enroll_server.enrollment.manufacturers import (
    CA_CERT,
    MANUFACTURERS_DIR,
    manufacturers_dir,
    trusted_manufacturer_ca_files,
)
from enroll_server.home.layout import PASSPHRASE_ENV, HomeLayout
from enroll_server.pki.ca import CA_BACKDATE
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import (
    KeyType,
    PrivateKey,
    generate_key,
    load_private_key_pem,
    private_key_pem,
    signature_hash,
)
from enroll_server.pki.serial import new_serial
from fleetpki.atomic_file import PUBLIC_MODE, make_private_dir, write_atomic
from fleetpki.identity import is_valid_id
from provisioning.errors import ManufacturerError

DEFAULT_MANUFACTURER = "factory"
CA_KEY = "ca.key"
# IEEE 802.1AR 7.2.7.2 expects an IDevID (and so its CA) to outlive the device; 25 years
# covers industrial equipment without reaching for the 9999 "no expiry" date.
CA_VALIDITY = timedelta(days=25 * 366)


__all__ = [
    "CA_CERT",
    "MANUFACTURERS_DIR",
    "ManufacturerCa",
    "build_manufacturer_ca",
    "load_or_create_manufacturer",
    "manufacturers_dir",
    "trusted_manufacturer_ca_files",
]


@dataclass(frozen=True, slots=True)
class ManufacturerCa:
    name: str
    cert: x509.Certificate
    key: PrivateKey


def _folder(home: Path, name: str) -> Path:
    if not is_valid_id(name):
        raise ManufacturerError(name, "names use letters, digits, '-' and '_' only")
    return manufacturers_dir(home) / name


def build_manufacturer_ca(key: PrivateKey, name: str, now: datetime) -> x509.Certificate:
    """A self-signed root that may sign end-entity birth certificates only (pathLen 0)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Manufacturer CA"),
        ]
    )
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, signature_hash(key))
    )


def _passphrase(layout: HomeLayout) -> bytes:
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    try:
        return layout.passphrase_file.read_bytes().strip()
    except OSError as exc:
        raise ManufacturerError(
            "-", f"its key is encrypted with the home passphrase: set {PASSPHRASE_ENV}"
        ) from exc


def load_or_create_manufacturer(
    layout: HomeLayout, name: str, now: datetime, key_type: KeyType = KeyType.EC_P256
) -> ManufacturerCa:
    """Load H/manufacturers/<name>/, creating the CA on first use (key encrypted, 0600)."""
    folder = _folder(layout.root, name)
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    phrase = _passphrase(layout)
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = load_private_key_pem(key_path.read_bytes(), phrase, f"manufacturer CA {name}")
        except (OSError, ValueError, PkiError) as exc:
            raise ManufacturerError(name, f"cannot load {folder}: {exc}") from exc
        return ManufacturerCa(name, cert, key)
    make_private_dir(manufacturers_dir(layout.root))
    make_private_dir(folder)
    key = generate_key(key_type)
    cert = build_manufacturer_ca(key, name, now)
    write_atomic(key_path, private_key_pem(key, phrase))
    # The certificate last: its presence is what marks the CA as existing and trusted.
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return ManufacturerCa(name, cert, key)
