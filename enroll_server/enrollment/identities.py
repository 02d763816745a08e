"""Backend service identities: a key and clientAuth certificate with the service role, issued
and renewed by the operator (a running service may also renew itself over EST
simplereenroll with its current certificate, as a device does)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from enroll_server.home.layout import LoadedHome, load_home
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import generate_key, private_key_pem
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.registry import (
    CertStatus,
    Device,
    DeviceState,
    IssuedCertificate,
    Registry,
    Role,
)
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
    supersedes: int | None = None  # the certificate a renewal was made from

    @property
    def cert(self) -> Path:
        return self.folder / "cert.pem"

    @property
    def key(self) -> Path:
        return self.folder / "key.pem"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"


def service_folder(loaded: LoadedHome, service_id: DeviceId) -> Path:
    """Where `service issue` and `service renew` write a service's files by default."""
    return loaded.layout.root / "services" / service_id.value


def issue_service_identity(
    home: Path, name: str, out: Path | None, now: datetime, *, actor: str = "cli"
) -> ServiceIdentity:
    """Register service `name` (role 'service') and write cert.pem, key.pem (0600), ca.pem.
    `actor`: who the audit log names (the CLI, or a console operator)."""
    with _open(home, name, out) as (loaded, registry, service_id, folder):
        existing = registry.get_device(service_id)
        if existing is not None:
            if existing.role is not Role.SERVICE:
                raise ServiceIdentityError(name, "a device has this id")
            raise ServiceIdentityError(
                name,
                f"already exists ({existing.state.value}): `fleetpki service renew {name}` "
                "issues it a new key and certificate",
            )
        if folder.exists() and any(folder.iterdir()):
            raise ServiceIdentityError(name, f"{folder} exists and is not empty")
        registry.add_device(service_id, role="service", batch_id=None, now=now, actor=actor)
        serial = _issue(loaded, registry, service_id, folder, None, now, actor)
    return ServiceIdentity(folder, serial)


def renew_service_identity(
    home: Path, name: str, out: Path | None, now: datetime
) -> ServiceIdentity:
    """A new key and certificate for an existing service, written over its files.

    Renewed from its current certificate, which stays valid as the new one's fallback until
    the broker first admits the new one (a service still running with the old files goes on
    working until it reloads them); then it is revoked, reason superseded. A service with no
    valid certificate left (expired, or revoked on its own) starts over: every older
    certificate is cut off at once. Refused for a revoked or suspended service.
    """
    with _open(home, name, out) as (loaded, registry, service_id, folder):
        existing = _existing_service(registry, service_id)
        if existing.state is not DeviceState.ACTIVE:
            raise ServiceIdentityError(name, f"the service is {existing.state.value}")
        current = [
            c
            for c in registry.certificates_of(service_id)
            if c.status is CertStatus.ACTIVE and c.not_after > now
        ]
        supersedes = current[-1].serial if current else None
        serial = _issue(loaded, registry, service_id, folder, supersedes, now)
    return ServiceIdentity(folder, serial, supersedes)


def readmit_service_identity(
    home: Path, name: str, out: Path | None, now: datetime
) -> ServiceIdentity:
    """Undo a mistaken `service revoke`: the service is active again with a new key and
    certificate; every revoked certificate of it stays revoked (CRL, OCSP)."""
    with _open(home, name, out) as (loaded, registry, service_id, folder):
        existing = _existing_service(registry, service_id)
        if existing.state is not DeviceState.REVOKED:
            raise ServiceIdentityError(
                name, f"readmit is for revoked services, and it is {existing.state.value}"
            )
        registry.readmit_device(
            service_id, token_hash=None, token_expires_at=None, now=now, actor="cli"
        )
        serial = _issue(loaded, registry, service_id, folder, None, now)
    return ServiceIdentity(folder, serial)


@contextmanager
def _open(
    home: Path, name: str, out: Path | None
) -> Iterator[tuple[LoadedHome, Registry, DeviceId, Path]]:
    """The home, its registry (open), the service id and the service's folder."""
    service_id = DeviceId.parse(name)
    loaded = load_home(home)
    with Registry.open(loaded.registry) as registry:
        yield loaded, registry, service_id, out or service_folder(loaded, service_id)


def _existing_service(registry: Registry, service_id: DeviceId) -> Device:
    existing = registry.get_device(service_id)
    if existing is None or existing.role is not Role.SERVICE:
        what = "no such service" if existing is None else "a device has this id"
        raise ServiceIdentityError(
            service_id.value, f"{what} (`fleetpki service issue` creates one)"
        )
    return existing


def _issue(
    loaded: LoadedHome,
    registry: Registry,
    service_id: DeviceId,
    folder: Path,
    supersedes: int | None,
    now: datetime,
    actor: str = "cli",
) -> int:
    """Sign a service certificate for a new key, record it, then write the files."""
    key = generate_key(loaded.config.key_type)
    # A service certificate lives as long as a device's: `service renew` (or simplereenroll
    # with the current certificate) before 2/3 of it, as the agent does.
    profile = DeviceProfile(validity=loaded.config.device_validity, backdate=loaded.config.backdate)
    cert = build_device_certificate(
        key.public_key(), service_id, loaded.issuer, now, profile, role=Role.SERVICE
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    registry.record_issuance(
        IssuedCertificate(
            serial=cert.serial_number,
            device_id=service_id,
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            pem=pem.decode(),
            issuer_key_id=key_id(loaded.issuer.cert),
        ),
        consume_token_hash=None,
        supersedes_serial=supersedes,
        now=now,
        actor=actor,
    )
    make_private_dir(folder)
    write_atomic(folder / "key.pem", private_key_pem(key, None))
    issuing_pem = loaded.issuer.cert.public_bytes(serialization.Encoding.PEM)
    write_atomic(folder / "cert.pem", pem + issuing_pem, PUBLIC_MODE)
    write_atomic(
        folder / "ca.pem", loaded.root_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE
    )
    return cert.serial_number


def service_summary(registry: Registry, service: Device) -> dict[str, Any]:
    """A service and its current certificate, with when to renew it (`service list`, the
    console's services page)."""
    certs = registry.certificates_of(service.device_id)
    active = [c for c in certs if c.status is CertStatus.ACTIVE]
    current = active[-1] if active else None
    renew_by = None
    if current is not None:
        renew_by = current.not_before + (current.not_after - current.not_before) * 2 / 3
    return {
        "name": service.device_id.value,
        "state": service.state.value,
        "serial": None if current is None else f"{current.serial:x}",
        "not_after": None if current is None else current.not_after.isoformat(),
        # At 2/3 of the lifetime, as the device agent renews (device_agent/schedule.py).
        "renew_by": None if renew_by is None else renew_by.isoformat(),
    }
