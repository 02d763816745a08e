"""The error tree of the fleet registry; each error carries the offending value."""

from __future__ import annotations

from fleetpki.identity import DeviceId


class RegistryError(Exception):
    """Base of every error raised by enroll_server.registry."""


class DuplicateDevice(RegistryError):
    """A device id that is already registered (or appears twice in one batch)."""

    def __init__(self, device_id: DeviceId) -> None:
        super().__init__(f"device {device_id} is already registered")
        self.device_id = device_id


class UnknownDevice(RegistryError):
    """A device id the registry has never seen."""

    def __init__(self, device_id: DeviceId) -> None:
        super().__init__(f"device {device_id} is not registered")
        self.device_id = device_id


class DuplicateBatch(RegistryError):
    """A batch id that is already in use."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"batch {batch_id!r} already exists")
        self.batch_id = batch_id


class UnknownBatch(RegistryError):
    """A batch id the registry has never seen."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"batch {batch_id!r} is not registered")
        self.batch_id = batch_id


class TokenRejected(RegistryError):
    """A one-time enrollment token that cannot be used.

    `reason` is one of 'unknown', 'used', 'expired', 'wrong-device'. The token (and its hash)
    is deliberately not part of the message: messages end up in logs.
    """

    REASONS = frozenset({"unknown", "used", "expired", "wrong-device"})

    def __init__(self, device_id: DeviceId, reason: str) -> None:
        super().__init__(f"enrollment token for device {device_id} rejected: {reason}")
        self.device_id = device_id
        self.reason = reason


class DeviceNotActive(RegistryError):
    """A device whose state forbids the operation (issuing to a revoked device, ...)."""

    def __init__(self, device_id: DeviceId, state: str) -> None:
        super().__init__(f"device {device_id} is {state}")
        self.device_id = device_id
        self.state = state


class SchemaTooNew(RegistryError):
    """A registry file written by a newer fleetpki than this one."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"registry schema version {found} is newer than the newest this fleetpki knows "
            f"({known}); upgrade fleetpki"
        )
        self.found = found
        self.known = known


class SchemaTooOld(RegistryError):
    """A shared (PostgreSQL) registry at an older schema: nodes never migrate it by themselves,
    since other nodes may still run the older fleetpki against it."""

    def __init__(self, where: str, found: int, known: int) -> None:
        super().__init__(
            f"registry {where} has schema version {found}, older than this fleetpki's "
            f"({known}); run `fleetpki registry migrate` once all nodes run this version"
        )
        self.where = where
        self.found = found
        self.known = known


class NoSchema(RegistryError):
    """A PostgreSQL database without fleetpki's tables (`fleetpki init --registry` makes them)."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"registry {where} holds no fleetpki schema; create it with "
            "`fleetpki init --registry URL` (or `fleetpki registry copy` into it)"
        )
        self.where = where


class DuplicateToken(RegistryError):
    """A token hash that is already recorded (the same token handed to two devices)."""

    def __init__(self, device_id: DeviceId) -> None:
        super().__init__(f"the enrollment token given for device {device_id} is already in use")
        self.device_id = device_id


class DuplicateSerial(RegistryError):
    """A certificate serial number that is already recorded (RFC 5280 4.1.2.2: unique per CA)."""

    def __init__(self, serial: int) -> None:
        super().__init__(f"certificate serial {serial:x} is already recorded")
        self.serial = serial


class UnknownCertificate(RegistryError):
    """A certificate serial the registry does not hold (for the device named)."""

    def __init__(self, serial: int, device_id: DeviceId | None = None) -> None:
        whose = f" for device {device_id}" if device_id is not None else ""
        super().__init__(f"no certificate with serial {serial:x}{whose}")
        self.serial = serial
        self.device_id = device_id


class InvalidValue(RegistryError, ValueError):
    """A field value outside its allowed set (a state, role, reason, naive datetime, ...)."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"invalid {field} {value!r}: {why}")
        self.field = field
        self.value = value
        self.why = why


class RegistryBusy(RegistryError):
    """Another process held the registry's write lock longer than the busy timeout (or at
    all, for a write that was asked not to wait: `waited_ms` 0)."""

    def __init__(self, path: str, waited_ms: int) -> None:
        super().__init__(f"registry {path} stayed locked by another writer for {waited_ms} ms")
        self.path = path
        self.waited_ms = waited_ms


class RegistryUnavailable(RegistryBusy):
    """The registry cannot be reached (PostgreSQL down, restarting, refusing our login): as
    with a held lock, nothing of the request was recorded and the client may try again."""

    def __init__(self, where: str, why: str) -> None:
        RegistryError.__init__(self, f"registry {where} is unavailable: {why}")
        self.path = where
        self.waited_ms = 0
        self.why = why


class CertificateNotCurrent(RegistryError):
    """A renewal from a certificate that is no longer its identity's current one: revoked,
    on hold, or superseded by a newer certificate that has been used since."""

    def __init__(
        self, serial: int, device_id: DeviceId, status: str, reason: str | None = None
    ) -> None:
        why = status if reason is None else f"{status} ({reason})"
        super().__init__(f"certificate {serial:x} of {device_id} is {why}")
        self.serial = serial
        self.device_id = device_id
        self.status = status
        self.reason = reason


class UnknownOperator(RegistryError):
    def __init__(self, name: str) -> None:
        super().__init__(f"operator {name!r} is not registered")
        self.name = name


class DuplicateOperator(RegistryError):
    def __init__(self, name: str) -> None:
        super().__init__(f"operator {name!r} already exists (rotate its token instead)")
        self.name = name


class LastAdmin(RegistryError):
    """Removing (or demoting) the only admin-role operator would lock the admin API for good."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"operator {name!r} is the only admin: add another admin first "
            "(or rotate its token instead)"
        )
        self.name = name


class TargetNotEmpty(RegistryError):
    """`fleetpki registry copy` into a registry that already holds fleet data."""

    def __init__(self, where: str, table: str, rows: int) -> None:
        super().__init__(
            f"registry {where} is not empty ({rows} rows in {table}); copy only into a new one"
        )
        self.where = where
        self.table = table


class CopyMismatch(RegistryError):
    """A table whose row count or checksum differs between source and copy."""

    def __init__(self, table: str, detail: str) -> None:
        super().__init__(f"table {table} differs after the copy: {detail}")
        self.table = table


class CaStateConflict(RegistryError):
    """A CA state generation another process recorded first (home/ca_state.py)."""

    def __init__(self, generation: int) -> None:
        super().__init__(f"CA state generation {generation} was recorded meanwhile by another node")
        self.generation = generation
