"""Backend service identities: a key and clientAuth certificate with the service role."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from enroll_server.home import load_home
from enroll_server.pki.keys import generate_key, private_key_pem
from enroll_server.pki.profile import DeviceProfile, EndEntityRole, build_device_certificate
from enroll_server.registry import IssuedCertificate, Registry
from fleetpki.atomic_file import PUBLIC_MODE, make_private_dir, write_atomic
from fleetpki.identity import DeviceId


class ServiceIdentityError(Exception):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"service identity {name!r}: {why}")
        self.name = name
        self.why = why


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    folder: Path
    serial: int

    @property
    def cert(self) -> Path:
        return self.folder / "cert.pem"

    @property
    def key(self) -> Path:
        return self.folder / "key.pem"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"


def issue_service_identity(
    home: Path, name: str, out: Path | None, now: datetime
) -> ServiceIdentity:
    """Register service `name` (role 'service') and write cert.pem, key.pem (0600), ca.pem."""
    service_id = DeviceId.parse(name)
    loaded = load_home(home)
    folder = out or (loaded.layout.root / "services" / service_id.value)
    if folder.exists() and any(folder.iterdir()):
        raise ServiceIdentityError(name, f"{folder} exists and is not empty")
    key = generate_key(loaded.config.key_type)
    # A service certificate lives as long as a device's; operators re-issue it with this command.
    profile = DeviceProfile(validity=loaded.config.device_validity, backdate=loaded.config.backdate)
    cert = build_device_certificate(
        key.public_key(), service_id, loaded.issuer, now, profile, role=EndEntityRole.SERVICE
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    with Registry.open(loaded.layout.registry) as registry:
        if registry.get_device(service_id) is not None:
            raise ServiceIdentityError(name, "already exists")
        registry.add_device(service_id, role="service", batch_id=None, now=now, actor="cli")
        registry.record_issuance(
            IssuedCertificate(
                serial=cert.serial_number,
                device_id=service_id,
                fingerprint_sha256=hashlib.sha256(der).hexdigest(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                pem=pem.decode(),
            ),
            consume_token_hash=None,
            supersedes_serial=None,
            now=now,
            actor="cli",
        )
    make_private_dir(folder)
    result = ServiceIdentity(folder, cert.serial_number)
    write_atomic(result.key, private_key_pem(key, None))
    issuing_pem = loaded.issuer.cert.public_bytes(serialization.Encoding.PEM)
    write_atomic(result.cert, pem + issuing_pem, PUBLIC_MODE)
    write_atomic(result.ca, loaded.root_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return result
