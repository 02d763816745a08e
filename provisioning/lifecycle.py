"""A batch after creation: list, show, revoke the lot, export its manifest, reissue a token
(also to re-key a device or readmit a revoked one)."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

from enroll_server.home.config import ServerConfig
from enroll_server.home.layout import HomeLayout
from enroll_server.registry import (
    Batch,
    BatchKind,
    DeviceState,
    Registry,
    Role,
    UnknownBatch,
    UnknownDevice,
    parse_reason,
)
from fleetpki.identity import DeviceId
from provisioning import bundle as b
from provisioning.batch import Progress, iso_utc
from provisioning.errors import (
    BundlesNotPublished,
    InvalidBatchOption,
    OutputDirError,
    ReissueRefused,
)
from provisioning.manifest import export_rows
from provisioning.outdir import STAGING_SUFFIX, sync_filesystem
from provisioning.tokens import check_ttl, hash_token, new_token


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """A batch and its devices by situation (registry.batch_counts)."""

    batch: Batch
    counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        batch = self.batch
        return {
            "batch_id": batch.batch_id,
            "kind": batch.kind.value,
            "created_at": iso_utc(batch.created_at),
            "device_count": batch.device_count,
            "token_ttl_seconds": int(batch.token_ttl.total_seconds()),
            "note": batch.note,
            "counts": self.counts,
        }


def list_batches(registry: Registry, now: datetime) -> list[BatchSummary]:
    """Every batch, oldest first, with its counts at `now` (token expiry depends on it)."""
    return [
        BatchSummary(batch, registry.batch_counts(batch.batch_id, now))
        for batch in registry.list_batches()
    ]


def show_batch(registry: Registry, batch_id: str, now: datetime) -> BatchSummary:
    batch = registry.get_batch(batch_id)
    if batch is None:
        raise UnknownBatch(batch_id)
    return BatchSummary(batch, registry.batch_counts(batch_id, now))


def revoke_batch(
    registry: Registry,
    batch_id: str,
    *,
    reason: str,
    now: datetime,
    actor: str,
    progress: Progress | None = None,
) -> int:
    """Revoke every device of a lot (token or IDevID) and each certificate they hold.

    For an IDevID lot this is the "manufacturer lot" cut-off: its birth certificates stop
    authorizing enrollment at once, because the service checks the device state each time.
    """
    batch = registry.get_batch(batch_id)
    if batch is None:
        raise UnknownBatch(batch_id)
    total = batch.device_count

    def report(done: int) -> None:
        if progress is not None:
            progress("revoke", done, total)

    return registry.revoke_batch(
        batch_id, reason=parse_reason(reason), now=now, actor=actor, progress=report
    )


def export_manifest(registry: Registry, batch_id: str, out: TextIO, *, tar: bool = False) -> int:
    """Write the batch's manifest again, with each device's state; returns the row count.

    There are no tokens to export: the registry holds only their hashes.
    """
    if registry.get_batch(batch_id) is None:
        raise UnknownBatch(batch_id)
    writer = csv.writer(out, lineterminator="\n")
    rows = export_rows(registry, batch_id, tar=tar)
    writer.writerow(next(rows))
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count


class TokenPurpose(StrEnum):
    """Why a device gets a new one-time token (reissue_token)."""

    # A token besides its certificates: a lost bundle, a device re-flashed. Its enrollment
    # cuts off every older certificate of the device (registry.certificates).
    REISSUE = "reissue"
    # Re-key: every certificate of the device is cut off now (reason superseded), then the
    # token lets it enroll anew with a new key.
    REKEY = "rekey"
    # The way back after a mistaken revocation: the revoked certificates stay revoked.
    READMIT = "readmit"


@dataclass(frozen=True, slots=True)
class ReissuedToken:
    device_id: DeviceId
    token: str = field(repr=False)
    expires_at: datetime
    bundle: Path | None
    cut_off: tuple[int, ...] = ()  # serials a re-key revoked


def _check_reissue(
    registry: Registry, device_id: DeviceId, force: bool, purpose: TokenPurpose
) -> None:
    device = registry.get_device(device_id)
    if device is None:
        raise UnknownDevice(device_id)
    if device.role is Role.SERVICE:
        # A service's certificate is issued by the operator, never through a token bundle.
        raise ReissueRefused(
            device_id,
            f"it is a service identity (`fleetpki service renew|readmit {device_id}` gives it "
            "a new key and certificate)",
        )
    if purpose is TokenPurpose.READMIT:
        if device.state is not DeviceState.REVOKED:
            raise ReissueRefused(
                device_id, f"readmit is for revoked devices, and it is {device.state.value}"
            )
        return
    if device.state is DeviceState.REVOKED:
        raise ReissueRefused(
            device_id, "the device is revoked (`fleetpki device readmit` lets it enroll again)"
        )
    if device.state is DeviceState.SUSPENDED:
        raise ReissueRefused(
            device_id, "the device is suspended (`fleetpki device resume` it first)"
        )
    if purpose is TokenPurpose.REKEY:
        return
    batch = registry.get_batch(device.batch_id) if device.batch_id else None
    if batch is not None and batch.kind is BatchKind.IDEVID and not force:
        raise ReissueRefused(
            device_id, "it enrolls with its birth certificate (--force adds a token anyway)"
        )
    if device.state is DeviceState.ACTIVE and not force:
        raise ReissueRefused(
            device_id, "it is already enrolled (--force lets it enroll again with a new key)"
        )


def _replace(staged: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    os.rename(staged, target)


def reissue_token(
    registry: Registry,
    layout: HomeLayout,
    config: ServerConfig,
    device_id: DeviceId,
    *,
    ttl: timedelta | None,
    now: datetime,
    out_dir: Path | None,
    force: bool = False,
    device_key_type: str = "ec-p256",
    purpose: TokenPurpose = TokenPurpose.REISSUE,
    actor: str = "cli",
) -> ReissuedToken:
    """A new one-time token for a device; its previous unused token dies at once.

    With `out_dir`, a fresh bundle DIR/<id>/ is written and synced before the token is
    registered (a registered token nobody holds helps no one), replacing an existing bundle
    only with `force`. REISSUE is refused for revoked and suspended devices, and for IDevID
    devices and already-enrolled ones without `force`; REKEY (which also cuts off every
    certificate of the device, in the same transaction) for revoked and suspended devices;
    READMIT for any device not revoked.
    """
    _check_reissue(registry, device_id, force, purpose)
    if device_key_type not in b.DEVICE_KEY_TYPES:
        raise InvalidBatchOption(
            "device key type", device_key_type, "one of " + ", ".join(b.DEVICE_KEY_TYPES)
        )
    ttl = check_ttl(ttl if ttl is not None else config.token_ttl)
    token = new_token()
    expires_at = now + ttl

    def register() -> tuple[int, ...]:
        digest = hash_token(token)
        if purpose is TokenPurpose.REKEY:
            return tuple(
                registry.rekey_device(
                    device_id, token_hash=digest, token_expires_at=expires_at, now=now, actor=actor
                )
            )
        if purpose is TokenPurpose.READMIT:
            registry.readmit_device(
                device_id, token_hash=digest, token_expires_at=expires_at, now=now, actor=actor
            )
        else:
            registry.add_token(device_id, digest, expires_at, now, actor=actor)
        return ()

    if out_dir is None:
        cut_off = register()
        return ReissuedToken(device_id, token, expires_at, None, cut_off)

    out_dir = Path(out_dir).absolute()
    target = out_dir / device_id.value
    if (target.exists() or target.is_symlink()) and not force:
        raise OutputDirError(target, "exists (use --force to replace the bundle)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{device_id.value}.", suffix=STAGING_SUFFIX, dir=out_dir)
        )
    except OSError as exc:
        raise OutputDirError(out_dir, f"cannot create files: {exc.strerror or exc}") from exc
    try:
        settings = b.BundleSettings.from_config(config, device_key_type)
        b.BundleWriter(staging).write(
            device_id,
            {
                b.AGENT_TOML: b.render_agent_toml(device_id, settings, idevid=False).encode(),
                b.CA_PEM: layout.root_cert.read_bytes(),
                b.TOKEN_FILE: token.encode(),
            },
        )
        sync_filesystem(staging)
        cut_off = register()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _replace(staging / device_id.value, target)
    except OSError as exc:
        # The new token is registered and the old one dead: keep the only copy of the new one.
        raise BundlesNotPublished(
            f"reissue of {device_id}", staging, target, exc.strerror or str(exc)
        ) from exc
    shutil.rmtree(staging, ignore_errors=True)
    return ReissuedToken(device_id, token, expires_at, target, cut_off)
