"""The factory birth certificate (IDevID, IEEE 802.1AR): checking the bundle's pair before use.

The pair is checked with the ssl module, the code that presents it in the bootstrap TLS
handshake: a pair it accepts here is a pair that works there, and checking it costs an agent
that is already enrolled no cryptography import. Only the bootstrap itself (rare) parses the
certificate, to compare its name with the configured device id.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from device_agent.config import BirthCredentials
from device_agent.errors import ConfigError
from fleetpki.identity import DeviceId

CERT_KEY = "enroll.idevid_cert"
KEY_KEY = "enroll.idevid_key"


def _read(config_path: Path, key: str, path: Path, what: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            config_path, key, f"cannot read the {what} {path}: {exc.strerror or exc}"
        ) from exc
    if marker not in data:
        raise ConfigError(config_path, key, f"{path} is not a PEM {what}")
    return data


def check_birth_credentials(birth: BirthCredentials, config_path: Path) -> None:
    """Refuse a birth certificate or key that is missing, unreadable, not PEM, or a key that
    does not belong to the certificate; the ConfigError names agent.toml's key and the file."""
    _read(config_path, CERT_KEY, birth.cert, "birth certificate", b"-----BEGIN CERTIFICATE-----")
    _read(config_path, KEY_KEY, birth.key, "birth certificate key", b"PRIVATE KEY-----")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # An explicit empty password: an encrypted key fails instead of prompting on a TTY.
        ctx.load_cert_chain(str(birth.cert), str(birth.key), password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                config_path,
                KEY_KEY,
                f"{birth.key} does not match the birth certificate {birth.cert}",
            ) from exc
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(birth.cert))
        except ssl.SSLError:
            raise ConfigError(
                config_path, CERT_KEY, f"{birth.cert} is not a valid certificate ({exc.reason})"
            ) from exc
        raise ConfigError(
            config_path,
            KEY_KEY,
            f"{birth.key} is not a usable unencrypted private key ({exc.reason or exc})",
        ) from exc
    except OSError as exc:  # vanished between the read and the load
        raise ConfigError(config_path, CERT_KEY, f"cannot load the IDevID pair: {exc}") from exc


def check_birth_subject(birth: BirthCredentials, device_id: DeviceId, config_path: Path) -> None:
    """The birth certificate must name this device (CN = device id, as the service demands):
    a bundle mixed up at the factory is a local configuration error, not a refusal to retry."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    path = birth.cert
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigError(config_path, CERT_KEY, f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(config_path, CERT_KEY, f"{path} is not a valid certificate") from exc
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id.value]:
        raise ConfigError(
            config_path,
            CERT_KEY,
            f"{path} is the birth certificate of {', '.join(map(str, names)) or 'no CN'}, "
            f"not of device.id {device_id.value!r}",
        )
