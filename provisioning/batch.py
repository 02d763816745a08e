"""Factory batches: plan ids, mint credentials, write bundles, register the lot all or nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from device_agent.errors import ConfigError as AgentConfigError
from enroll_server.home.config import ServerConfig
from enroll_server.home.layout import HomeLayout
from enroll_server.pki.keys import KeyType, PublicKey, generate_key, private_key_pem
from enroll_server.registry import (
    BatchKind,
    DuplicateBatch,
    DuplicateDevice,
    NewDevice,
    Registry,
)
from fleetpki.identity import DeviceId, is_valid_id
from provisioning import bundle as b
from provisioning.csr_list import CsrList, scan_csr_list
from provisioning.errors import (
    BundlesNotPublished,
    CsrListError,
    DeviceIdTaken,
    InvalidBatchOption,
    SerialListError,
)
from provisioning.idevid import build_birth_certificate
from provisioning.ids import SequencePlan, SerialList, check_count, plan_sequence, scan_serials
from provisioning.manifest import MANIFEST_NAME, ManifestWriter
from provisioning.manufacturer import DEFAULT_MANUFACTURER, load_or_create_manufacturer
from provisioning.outdir import StagedOutput, check_out_dir
from provisioning.tokens import DeviceToken, check_ttl, hash_token, new_token

# progress(phase, done, total): phases "bundles" (credentials and files), "sync" (one
# file-system sync, reported once done), "registry" (rows inserted in the one transaction;
# the last report comes after the commit), "publish" (moved into place).
Progress = Callable[[str, int, int], None]
PROGRESS_EVERY = 100
# Tokens handed back in memory (admin API, no output folder): a response, not a lot on disk.
MAX_IN_MEMORY = 100_000
# Hash spool inside the staging folder: (id, SHA-256 of token) lines written with the bundles
# and read back by the registry insert, so the registry's write lock is held only for the
# inserts, never while 100,000 bundles are being written.
_SPOOL = ".registry-spool"


@dataclass(frozen=True, slots=True)
class IdevidOptions:
    """Birth certificates instead of tokens. `csrs`: the factory key store's CSR list (the
    private keys never leave the factory); None: keys generated here, one per bundle."""

    manufacturer: str = DEFAULT_MANUFACTURER
    csrs: Path | None = None
    key_type: KeyType = KeyType.EC_P256


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """What an operator asks for. Ids: `serials` (a CSV), else the CSR list's CNs (IDevID),
    else `prefix` + a sequence of `count` numbers from `start`."""

    count: int | None = None
    prefix: str = "dev-"
    start: int = 1
    serials: Path | None = None
    token_ttl: timedelta | None = None
    out_dir: Path | None = None
    tar: bool = False
    force: bool = False
    batch_id: str | None = None
    note: str = ""
    device_key_type: str = "ec-p256"
    idevid: IdevidOptions | None = None
    # Several nodes: the EST base URLs and "host:port" brokers the bundles name (agent
    # failover); empty: the home's own (public_host, its ports).
    est_urls: tuple[str, ...] = ()
    brokers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchResult:
    batch_id: str
    kind: BatchKind
    count: int
    created_at: datetime
    token_expires_at: datetime | None
    out_dir: Path | None
    manifest: Path | None
    # Only when no output folder was given: the clear tokens, for the caller to hand over.
    tokens: tuple[DeviceToken, ...] | None = field(default=None, repr=False)
    # True: this run did not create the batch but finished one a killed run had registered
    # and not yet moved into its folder (see finish_interrupted).
    resumed: bool = False

    def to_json(self, *, include_tokens: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch_id": self.batch_id,
            "kind": self.kind.value,
            "count": self.count,
            "created_at": iso_utc(self.created_at),
            "token_expires_at": iso_utc(self.token_expires_at),
            "out_dir": None if self.out_dir is None else str(self.out_dir),
            "manifest": None if self.manifest is None else str(self.manifest),
            "resumed": self.resumed,
        }
        if include_tokens and self.tokens is not None:
            out["tokens"] = [
                {"device_id": t.device_id.value, "token": t.token} for t in self.tokens
            ]
        return out


def iso_utc(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_batch_id(now: datetime) -> str:
    """lot-YYYYMMDD-HHMMSS-xxxx: sortable, readable, and two operators never collide."""
    return f"lot-{now.astimezone(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


# ---------------------------------------------------------------------------- id sources


@dataclass(frozen=True, slots=True)
class _Source:
    """A validated supply of (device id, public key or None) with its size."""

    count: int
    entries: Callable[[], Iterator[tuple[DeviceId, PublicKey | None]]]
    conflict: Callable[[DeviceId], Exception]
    # Ids worth looking up before any work: the first and last of a sequence.
    sample: tuple[DeviceId, ...] = ()


def _sequence_source(plan: SequencePlan) -> _Source:
    def entries() -> Iterator[tuple[DeviceId, PublicKey | None]]:
        for device_id in plan.ids():
            yield device_id, None

    return _Source(
        plan.count,
        entries,
        lambda d: DeviceIdTaken(d, "choose another --prefix or --start"),
        (plan.first, plan.last),
    )


def _serial_source(serials: SerialList) -> _Source:
    def entries() -> Iterator[tuple[DeviceId, PublicKey | None]]:
        for device_id in serials.ids():
            yield device_id, None

    def conflict(device_id: DeviceId) -> Exception:
        line = serials.line_of(device_id) or 0
        return SerialListError(serials.path, line, device_id.value, "already registered")

    return _Source(serials.count, entries, conflict)


def _csr_source(csrs: CsrList) -> _Source:
    def entries() -> Iterator[tuple[DeviceId, PublicKey | None]]:
        yield from csrs.entries()

    def conflict(device_id: DeviceId) -> Exception:
        return CsrListError(csrs.path, csrs.index_of(device_id) or 0, f"{device_id} is registered")

    return _Source(csrs.count, entries, conflict)


def _source(request: BatchRequest) -> _Source:
    """Validate the whole id supply before anything is created."""
    csrs = request.idevid.csrs if request.idevid is not None else None
    given = [n for n, v in (("--ids-from", request.serials), ("--idevid-csrs", csrs)) if v]
    if len(given) > 1:
        raise InvalidBatchOption("id source", " and ".join(given), "give only one")
    if given and request.count is not None:
        raise InvalidBatchOption(
            "count", request.count, f"the count comes from {given[0]}; leave --count out"
        )
    if request.serials is not None:
        return _serial_source(scan_serials(request.serials))
    if csrs is not None:
        return _csr_source(scan_csr_list(csrs))
    if request.count is None:
        raise InvalidBatchOption("count", None, "give --count (or --ids-from)")
    plan = plan_sequence(request.prefix, check_count(request.count), request.start)
    return _sequence_source(plan)


# ---------------------------------------------------------------------------- create


def _check_request(request: BatchRequest, batch_id: str) -> None:
    if not is_valid_id(batch_id):
        raise InvalidBatchOption(
            "batch id", batch_id, "letters, digits, '-' and '_' only, at most 64 characters"
        )
    if request.device_key_type not in b.DEVICE_KEY_TYPES:
        raise InvalidBatchOption(
            "device key type", request.device_key_type, "one of " + ", ".join(b.DEVICE_KEY_TYPES)
        )
    if request.idevid is not None and request.out_dir is None:
        raise InvalidBatchOption("output folder", None, "IDevID batches need --out")
    if request.out_dir is not None:
        check_out_dir(Path(request.out_dir).absolute(), request.force)


def _bundle_settings(config: ServerConfig, request: BatchRequest) -> b.BundleSettings:
    """What every agent.toml of the batch says; InvalidBatchOption if the agent would refuse
    it (a --est-url that is no https:// base URL, a --broker that is no host:port)."""
    settings = b.BundleSettings.from_config(config, request.device_key_type)
    if not (request.est_urls or request.brokers):
        return settings
    settings = dataclasses.replace(settings, est_urls=request.est_urls, brokers=request.brokers)
    try:
        settings.check()
    except AgentConfigError as exc:
        est = (exc.key or "").startswith("enroll")
        option, given = ("--est-url", request.est_urls) if est else ("--broker", request.brokers)
        raise InvalidBatchOption(option, " ".join(given), exc.why) from None
    return settings


def _precheck_ids(registry: Registry, source: _Source) -> None:
    # The common mistake (the same --prefix twice) caught before 100,000 bundles are written;
    # every other collision is caught by the all-or-nothing insert.
    for device_id in source.sample:
        if registry.get_device(device_id) is not None:
            raise source.conflict(device_id)


def create_batch(
    registry: Registry,
    layout: HomeLayout,
    config: ServerConfig,
    request: BatchRequest,
    *,
    now: datetime,
    actor: str,
    progress: Progress | None = None,
) -> BatchResult:
    """Create a factory batch: all or nothing.

    1. validate everything (ids, options, output folder) - a bad input creates nothing;
    2. write every bundle, the manifest and a hash spool into a hidden staging folder beside
       DIR, then one file-system sync (the bundles hold the only copy of the tokens, so they
       are durable before the registry may say the batch exists);
    3. insert the batch in one registry transaction (DuplicateDevice rolls it all back);
    4. rename the staging folder to DIR.
    Any exception in 1-3 (including KeyboardInterrupt) removes the staging folder and leaves
    the registry without a row of the batch. A run killed outright (kill -9, power cut) leaves
    a hidden staging folder; the next run into the same parent folder finishes it
    (finish_interrupted): published if the registry committed its batch, removed if not. If
    that batch was this request's (the same DIR or batch id), the result is that batch.
    """
    batch_id = request.batch_id or new_batch_id(now)
    if request.out_dir is not None:
        resumed = finish_interrupted(registry, Path(request.out_dir).absolute(), batch_id)
        if resumed is not None:
            return resumed
    _check_request(request, batch_id)
    _bundle_settings(config, request)
    source = _source(request)
    kind = BatchKind.IDEVID if request.idevid is not None else BatchKind.TOKEN
    ttl = check_ttl(request.token_ttl if request.token_ttl is not None else config.token_ttl)
    if request.out_dir is None and source.count > MAX_IN_MEMORY:
        raise InvalidBatchOption(
            "count", source.count, f"at most {MAX_IN_MEMORY} without an output folder"
        )
    if registry.get_batch(batch_id) is not None:
        raise DuplicateBatch(batch_id)
    _precheck_ids(registry, source)
    token_expires_at = now + ttl if kind is BatchKind.TOKEN else None

    if request.out_dir is None:
        tokens = _mint_in_memory(source, now + ttl, progress)
        devices: Iterator[NewDevice] = (NewDevice(t.device_id, t.token_hash) for t in tokens)
        count = _register(registry, batch_id, devices, kind, ttl, now, actor, request, source)
        _report(progress, "registry", count, source.count)
        return BatchResult(batch_id, kind, count, now, token_expires_at, None, None, tuple(tokens))

    staged = StagedOutput.prepare(Path(request.out_dir), force=request.force, batch_id=batch_id)
    try:
        _write_bundles(staged, layout, config, request, source, batch_id, kind, now, ttl, progress)
        count = _register(
            registry, batch_id, _read_spool(staged.staging, progress, source.count), kind, ttl,
            now, actor, request, source,
        )  # fmt: skip
    except BaseException:
        staged.discard()
        raise
    # Committed: the bundles now hold the only copy of live tokens and are never discarded;
    # whatever stops the move (even Ctrl-C) is reported with where they are.
    try:
        os.unlink(staged.staging / _SPOOL)
        _report(progress, "registry", count, count)
        staged.publish()
    except BaseException as exc:
        why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or repr(exc)
        raise BundlesNotPublished(batch_id, staged.staging, staged.out_dir, why) from exc
    _report(progress, "publish", count, count)
    return BatchResult(
        batch_id,
        kind,
        count,
        now,
        token_expires_at,
        staged.out_dir,
        staged.out_dir / MANIFEST_NAME,
    )


def finish_interrupted(registry: Registry, out_dir: Path, batch_id: str) -> BatchResult | None:
    """Finish what killed runs left beside `out_dir`: a staging folder whose batch the
    registry committed is published into its DIR (its bundles hold the only copy of live
    tokens); one whose batch never committed is removed (its tokens were never registered).
    Returns the finished batch if it is the one asked for (same DIR or same batch id)."""
    mine = None
    for staged in StagedOutput.leftovers(out_dir.parent):
        batch = registry.get_batch(staged.batch_id)
        if batch is None:
            staged.discard()
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged.staging / _SPOOL)
            staged.publish()
        except OSError as exc:
            staged.release()
            raise BundlesNotPublished(
                batch.batch_id, staged.staging, staged.out_dir, exc.strerror or str(exc)
            ) from exc
        if staged.out_dir == out_dir or batch.batch_id == batch_id:
            mine = BatchResult(
                batch.batch_id,
                batch.kind,
                batch.device_count,
                batch.created_at,
                batch.created_at + batch.token_ttl if batch.kind is BatchKind.TOKEN else None,
                staged.out_dir,
                staged.out_dir / MANIFEST_NAME,
                resumed=True,
            )
    return mine


def _report(progress: Progress | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)


def _mint_in_memory(
    source: _Source, expires_at: datetime, progress: Progress | None
) -> list[DeviceToken]:
    tokens = []
    for device_id, _ in source.entries():
        tokens.append(DeviceToken(device_id, new_token(), expires_at))
        if len(tokens) % PROGRESS_EVERY == 0:
            _report(progress, "bundles", len(tokens), source.count)
    return tokens


def _write_bundles(
    staged: StagedOutput,
    layout: HomeLayout,
    config: ServerConfig,
    request: BatchRequest,
    source: _Source,
    batch_id: str,
    kind: BatchKind,
    now: datetime,
    ttl: timedelta,
    progress: Progress | None,
) -> None:
    """Phase 2: bundles + manifest + spool in the staging folder, then one sync."""
    ca_pem = layout.root_cert.read_bytes()
    settings = _bundle_settings(config, request)
    writer = b.BundleWriter(staged.staging, tar=request.tar, mtime=now.timestamp())
    idevid = request.idevid
    manufacturer = (
        load_or_create_manufacturer(layout, idevid.manufacturer, now)
        if idevid is not None
        else None
    )
    expires_at = now + ttl if kind is BatchKind.TOKEN else None
    done = 0
    with (
        ManifestWriter(staged.staging / MANIFEST_NAME) as manifest,
        open(staged.staging / _SPOOL, "w", encoding="ascii") as spool,
    ):
        for device_id, public_key in source.entries():
            toml = b.render_agent_toml(device_id, settings, idevid=idevid is not None).encode()
            if manufacturer is None:
                token = new_token()
                files = {b.AGENT_TOML: toml, b.CA_PEM: ca_pem, b.TOKEN_FILE: token.encode()}
                spool.write(f"{device_id.value} {hash_token(token)}\n")
            else:
                assert idevid is not None
                files = {b.AGENT_TOML: toml, b.CA_PEM: ca_pem}
                if public_key is None:
                    key = generate_key(idevid.key_type)
                    public_key = key.public_key()
                    files[b.IDEVID_KEY] = private_key_pem(key, None)
                cert = build_birth_certificate(public_key, device_id, batch_id, manufacturer, now)
                files[b.IDEVID_CERT] = cert.public_bytes(serialization.Encoding.PEM)
                spool.write(f"{device_id.value} -\n")
            manifest.row(device_id, writer.write(device_id, files), expires_at)
            done += 1
            if done % PROGRESS_EVERY == 0:
                _report(progress, "bundles", done, source.count)
    _report(progress, "bundles", done, source.count)
    staged.sync()
    _report(progress, "sync", 1, 1)


def _read_spool(staging: Path, progress: Progress | None, total: int) -> Iterator[NewDevice]:
    done = 0
    with open(staging / _SPOOL, encoding="ascii") as spool:
        for line in spool:
            value, digest = line.split()
            yield NewDevice(DeviceId(value), None if digest == "-" else digest)
            done += 1
            if done % PROGRESS_EVERY == 0:
                _report(progress, "registry", done, total)


def _register(
    registry: Registry,
    batch_id: str,
    devices: Iterator[NewDevice],
    kind: BatchKind,
    ttl: timedelta,
    now: datetime,
    actor: str,
    request: BatchRequest,
    source: _Source,
) -> int:
    try:
        return registry.create_batch(
            batch_id, devices, kind=kind.value, token_ttl=ttl, now=now, actor=actor,
            note=request.note,
            manufacturer=request.idevid.manufacturer if request.idevid is not None else None,
        )  # fmt: skip
    except DuplicateDevice as exc:
        raise source.conflict(exc.device_id) from exc


def provision_batch(
    registry: Registry,
    layout: HomeLayout,
    config: ServerConfig,
    *,
    count: int,
    prefix: str,
    token_ttl: timedelta | None,
    now: datetime,
    actor: str,
    out_dir: Path | None = None,
    batch_id: str | None = None,
    start: int = 1,
    note: str = "",
    progress: Progress | None = None,
) -> BatchResult:
    """A token batch from a prefix and a count (the admin API's POST /admin/batches, the
    console's batch form).

    With out_dir=None nothing is written to disk: BatchResult.tokens holds the clear tokens
    (at most MAX_IN_MEMORY) and the registry holds only their hashes.
    """
    request = BatchRequest(
        count=count,
        prefix=prefix,
        start=start,
        token_ttl=token_ttl,
        out_dir=out_dir,
        batch_id=batch_id,
        note=note,
    )
    return create_batch(registry, layout, config, request, now=now, actor=actor, progress=progress)
