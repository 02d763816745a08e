"""The error tree of factory provisioning; each error carries the offending value."""

from __future__ import annotations

from pathlib import Path

from fleetpki.identity import DeviceId

NOTHING_CREATED = "nothing was created"


class ProvisioningError(Exception):
    """Base of every error raised by the provisioning package."""


class InvalidCount(ProvisioningError, ValueError):
    """A device count outside 1..MAX_BATCH."""

    def __init__(self, count: int, why: str) -> None:
        super().__init__(f"invalid device count {count}: {why}")
        self.count = count
        self.why = why


class InvalidBatchOption(ProvisioningError, ValueError):
    """An option value that cannot make a batch (a prefix, a ttl, a batch id, a combination)."""

    def __init__(self, option: str, value: object, why: str) -> None:
        super().__init__(f"invalid {option} {value!r}: {why}")
        self.option = option
        self.value = value
        self.why = why


class SerialListError(ProvisioningError, ValueError):
    """A bad line in the manufacturer's serial list (checked before anything is created)."""

    def __init__(self, path: Path, line: int, value: str, why: str) -> None:
        super().__init__(f"{path} line {line}: {value!r}: {why}; {NOTHING_CREATED}")
        self.path = path
        self.line = line
        self.value = value
        self.why = why


class CsrListError(ProvisioningError, ValueError):
    """A bad CSR in the factory's CSR list (IDevID batches), named by its position."""

    def __init__(self, path: Path, index: int, why: str) -> None:
        super().__init__(f"{path} CSR #{index}: {why}; {NOTHING_CREATED}")
        self.path = path
        self.index = index
        self.why = why


class DeviceIdTaken(ProvisioningError):
    """A planned device id that the registry already holds (the whole batch was refused)."""

    def __init__(self, device_id: DeviceId, hint: str) -> None:
        super().__init__(f"device {device_id} is already registered; {hint}; {NOTHING_CREATED}")
        self.device_id = device_id
        self.hint = hint


class OutputDirError(ProvisioningError):
    """The bundle output folder cannot be used (not empty, not writable, not a folder)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"output folder {path}: {why}")
        self.path = path
        self.why = why


class BundlesNotPublished(ProvisioningError):
    """The batch is registered but its bundles could not be moved into place.

    The bundles are complete and durable in `staging`; the operator moves them by hand.
    """

    def __init__(self, batch_id: str, staging: Path, out_dir: Path, why: str) -> None:
        super().__init__(
            f"batch {batch_id!r} is registered and its bundles are complete in {staging} "
            f"(any already moved are in {out_dir}), but moving them failed: {why}"
        )
        self.batch_id = batch_id
        self.staging = staging
        self.out_dir = out_dir
        self.why = why


class ReissueRefused(ProvisioningError):
    """A device that must not get a new enrollment token (revoked, IDevID, already enrolled)."""

    def __init__(self, device_id: DeviceId, why: str) -> None:
        super().__init__(f"no new token for device {device_id}: {why}")
        self.device_id = device_id
        self.why = why


class ManufacturerError(ProvisioningError):
    """A manufacturer CA that is missing, unreadable or malformed."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"manufacturer CA {name!r}: {why}")
        self.name = name
        self.why = why
