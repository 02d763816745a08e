"""Registry: the fleet registry on one SQLite file (WAL), shared safely by several processes."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from enroll_server.registry.codec import (
    AUDIT_COLUMNS,
    BATCH_COLUMNS,
    CERTIFICATE_COLUMNS,
    DEVICE_COLUMNS,
    EVENT_COLUMNS,
    audit_from_row,
    batch_from_row,
    certificate_from_row,
    detail_json,
    device_from_row,
    event_from_row,
    parse_ts,
    serial_hex,
    serial_int,
    serials_json,
    ts,
)
from enroll_server.registry.errors import (
    DeviceNotActive,
    DuplicateBatch,
    DuplicateDevice,
    DuplicateFingerprint,
    DuplicateSerial,
    DuplicateToken,
    InvalidValue,
    RegistryBusy,
    TokenRejected,
    UnknownBatch,
    UnknownCertificate,
    UnknownDevice,
)
from enroll_server.registry.models import (
    REVOKE_REASONS,
    AuditEntry,
    Batch,
    BatchKind,
    CertificateRecord,
    Device,
    DeviceState,
    Event,
    EventKind,
    IssuedCertificate,
    NewDevice,
    RevokedEntry,
    Role,
    check_sha256_hex,
    parse_reason,
)
from enroll_server.registry.schema import migrate
from fleetpki.identity import DeviceId

# The f-string queries marked `noqa: S608` only interpolate the constant column lists of
# codec.py (and fixed WHERE fragments); every value goes through a `?` parameter.

BUSY_TIMEOUT_MS = 5000
# Rows per executemany() in create_batch: big enough to amortize the Python loop, small
# enough that a generator of 100k devices is never materialized at once.
_BATCH_CHUNK = 2000
# Devices revoked per transaction in revoke_batch: keeps each write lock hold short so the
# server and the broker are never starved while an operator revokes a whole batch.
_REVOKE_CHUNK = 500

_E = TypeVar("_E", bound=StrEnum)


def _enum(kind: type[_E], what: str, value: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidValue(what, value, f"expected one of {allowed}") from None


def _enable_wal(db: Database, path: Path) -> None:
    """Switch the file to WAL, retrying while another process holds it.

    Changing journal_mode can fail with SQLITE_BUSY at once, without consulting the busy
    handler, when several processes open a fresh file together; so retry with backoff up to
    the busy timeout. Once one process has switched, the mode is persistent in the file.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.002
    while True:
        try:
            db.enable_wal()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise RegistryBusy(str(path), BUSY_TIMEOUT_MS) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class Registry:
    """The fleet registry. Every write is one short `BEGIN IMMEDIATE` transaction.

    BEGIN IMMEDIATE (not the default deferred BEGIN) takes the write lock up front, so two
    processes never both read then try to upgrade to writing - that upgrade fails with
    SQLITE_BUSY immediately in WAL mode instead of waiting for busy_timeout. One instance may
    be shared by threads: a lock serializes use of its connection.
    """

    def __init__(self, db: Database, path: Path) -> None:
        """Use Registry.open(path)."""
        self._db = db
        self._conn: sqlite3.Connection = db.conn
        self._path = path
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: Path) -> Registry:
        """Open (creating if needed) the registry at `path`, switch to WAL and migrate."""
        path = Path(path)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Per connection, and a no-op inside a transaction: set before anything else.
            conn.execute("PRAGMA foreign_keys = ON")
            db = Database(conn, execute_plugins=False)
            _enable_wal(db, path)
            # NORMAL is durable-enough in WAL mode: a power cut may lose the last commits but
            # never corrupts the file (https://www.sqlite.org/pragma.html#pragma_synchronous).
            conn.execute("PRAGMA synchronous = NORMAL")
            registry = cls(db, path)
            with registry._write() as tx:
                migrate(tx)
        except BaseException:
            conn.close()
            raise
        return registry

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return str(self._db.journal_mode)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise RegistryBusy(str(self._path), BUSY_TIMEOUT_MS) from exc
                raise
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # Outside a transaction each SELECT reads its own consistent WAL snapshot.
        with self._lock:
            yield self._conn

    # ------------------------------------------------------------------ shared SQL

    @staticmethod
    def _state_of(conn: sqlite3.Connection, device_id: DeviceId) -> DeviceState | None:
        row = conn.execute("SELECT state FROM devices WHERE id = ?", (device_id.value,)).fetchone()
        return None if row is None else DeviceState(row[0])

    @staticmethod
    def _audit(
        conn: sqlite3.Connection,
        at: str,
        actor: str,
        action: str,
        device_id: DeviceId | None,
        detail: dict[str, Any],
    ) -> None:
        conn.execute(
            "INSERT INTO audit (at, actor, action, device_id, detail) VALUES (?, ?, ?, ?, ?)",
            (
                at,
                actor,
                action,
                None if device_id is None else device_id.value,
                detail_json(detail),
            ),
        )

    @staticmethod
    def _event(
        conn: sqlite3.Connection, at: str, kind: EventKind, device_id: DeviceId, serials: list[int]
    ) -> None:
        conn.execute(
            "INSERT INTO events (at, kind, device_id, serials) VALUES (?, ?, ?, ?)",
            (at, kind.value, device_id.value, serials_json(serials)),
        )

    @staticmethod
    def _token_problem(
        conn: sqlite3.Connection, device_id: DeviceId, token_hash: str, now_s: str
    ) -> str | None:
        row = conn.execute(
            "SELECT device_id, expires_at, used_at FROM tokens WHERE token_hash = ?",
            (token_hash,),
        ).fetchone()
        if row is None:
            return "unknown"
        if row[0] != device_id.value:
            return "wrong-device"
        if row[2] is not None:
            return "used"
        if row[1] <= now_s:
            return "expired"
        return None

    # ------------------------------------------------------------------ devices & batches

    def create_batch(
        self,
        batch_id: str,
        devices: Iterable[NewDevice],
        *,
        kind: str,
        token_ttl: timedelta,
        now: datetime,
        actor: str,
        note: str = "",
    ) -> int:
        """Register a factory batch and its devices, all or nothing; returns the device count.

        A device id seen twice (in `devices` or already registered) raises DuplicateDevice
        and leaves the registry unchanged. `devices` is consumed lazily, in chunks.
        """
        batch_kind = _enum(BatchKind, "batch kind", kind)
        if token_ttl <= timedelta(0):
            raise InvalidValue("token ttl", token_ttl, "must be positive")
        if not batch_id:
            raise InvalidValue("batch id", batch_id, "must not be empty")
        now_s = ts(now, "now")
        default_expiry = ts(now + token_ttl)
        source = iter(devices)
        count = 0
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO batches (id, created_at, device_count, token_ttl_seconds, note, "
                    "kind) VALUES (?, ?, 0, ?, ?, ?)",
                    (batch_id, now_s, int(token_ttl.total_seconds()), note, batch_kind.value),
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateBatch(batch_id) from exc
            while chunk := list(islice(source, _BATCH_CHUNK)):
                device_rows = []
                token_rows = []
                for new in chunk:
                    expiry: str | None = None
                    if new.token_hash is not None:
                        check_sha256_hex("token hash", new.token_hash)
                        expiry = (
                            default_expiry
                            if new.token_expires_at is None
                            else ts(new.token_expires_at, "token expiry")
                        )
                        token_rows.append((new.token_hash, new.device_id.value, now_s, expiry))
                    device_rows.append((new.device_id.value, batch_id, now_s, now_s, expiry))
                # A savepoint so that, after a failed chunk, the rows of earlier chunks are
                # still there to tell which id of this chunk was the duplicate.
                conn.execute("SAVEPOINT batch_chunk")
                try:
                    conn.executemany(
                        "INSERT INTO devices (id, role, batch_id, state, created_at, updated_at, "
                        "token_expires_at) VALUES (?, 'device', ?, 'provisioned', ?, ?, ?)",
                        device_rows,
                    )
                except sqlite3.IntegrityError as exc:
                    conn.execute("ROLLBACK TO batch_chunk")
                    duplicate = self._first_duplicate(conn, chunk)
                    if duplicate is None:
                        raise
                    raise DuplicateDevice(duplicate) from exc
                conn.execute("RELEASE batch_chunk")
                try:
                    conn.executemany(
                        "INSERT INTO tokens (token_hash, device_id, created_at, expires_at) "
                        "VALUES (?, ?, ?, ?)",
                        token_rows,
                    )
                except sqlite3.IntegrityError as exc:
                    raise DuplicateToken(self._first_duplicate_token(conn, chunk)) from exc
                count += len(chunk)
            conn.execute("UPDATE batches SET device_count = ? WHERE id = ?", (count, batch_id))
            self._audit(
                conn,
                now_s,
                actor,
                "batch.create",
                None,
                {"batch_id": batch_id, "kind": batch_kind.value, "devices": count, "note": note},
            )
        return count

    @staticmethod
    def _first_duplicate(conn: sqlite3.Connection, chunk: list[NewDevice]) -> DeviceId | None:
        seen: set[str] = set()
        for new in chunk:
            value = new.device_id.value
            exists = conn.execute("SELECT 1 FROM devices WHERE id = ?", (value,)).fetchone()
            if value in seen or exists is not None:
                return new.device_id
            seen.add(value)
        return None

    @staticmethod
    def _first_duplicate_token(conn: sqlite3.Connection, chunk: list[NewDevice]) -> DeviceId:
        seen: set[str] = set()
        for new in chunk:
            if new.token_hash is None:
                continue
            exists = conn.execute(
                "SELECT 1 FROM tokens WHERE token_hash = ?", (new.token_hash,)
            ).fetchone()
            if new.token_hash in seen or exists is not None:
                return new.device_id
            seen.add(new.token_hash)
        return chunk[0].device_id

    def add_device(
        self,
        device_id: DeviceId,
        *,
        role: str = "device",
        batch_id: str | None = None,
        now: datetime,
        actor: str,
    ) -> Device:
        """Register one device or backend service (state 'provisioned')."""
        role_v = _enum(Role, "role", role)
        now_s = ts(now, "now")
        with self._write() as conn:
            if self._state_of(conn, device_id) is not None:
                raise DuplicateDevice(device_id)
            if batch_id is not None:
                if (
                    conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone()
                    is None
                ):
                    raise UnknownBatch(batch_id)
                conn.execute(
                    "UPDATE batches SET device_count = device_count + 1 WHERE id = ?", (batch_id,)
                )
            conn.execute(
                "INSERT INTO devices (id, role, batch_id, state, created_at, updated_at) "
                "VALUES (?, ?, ?, 'provisioned', ?, ?)",
                (device_id.value, role_v.value, batch_id, now_s, now_s),
            )
            self._audit(
                conn,
                now_s,
                actor,
                "device.add",
                device_id,
                {"role": role_v.value, "batch_id": batch_id},
            )
            row = conn.execute(
                f"SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?",  # noqa: S608
                (device_id.value,),
            ).fetchone()
        return device_from_row(row)

    def get_device(self, device_id: DeviceId) -> Device | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?",  # noqa: S608
                (device_id.value,),
            ).fetchone()
        return None if row is None else device_from_row(row)

    def list_devices(
        self,
        *,
        state: str | None = None,
        batch_id: str | None = None,
        role: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[Device]:
        """Devices ordered by id, optionally filtered; page with limit/offset."""
        where: list[str] = []
        params: list[Any] = []
        if state is not None:
            where.append("state = ?")
            params.append(_enum(DeviceState, "device state", state).value)
        if batch_id is not None:
            where.append("batch_id = ?")
            params.append(batch_id)
        if role is not None:
            where.append("role = ?")
            params.append(_enum(Role, "role", role).value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params += [limit, offset]
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {DEVICE_COLUMNS} FROM devices {clause} ORDER BY id LIMIT ? OFFSET ?",  # noqa: S608
                params,
            ).fetchall()
        return [device_from_row(r) for r in rows]

    def count_devices(self, *, state: str | None = None, batch_id: str | None = None) -> int:
        where: list[str] = []
        params: list[Any] = []
        if state is not None:
            where.append("state = ?")
            params.append(_enum(DeviceState, "device state", state).value)
        if batch_id is not None:
            where.append("batch_id = ?")
            params.append(batch_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as conn:
            row = conn.execute(f"SELECT count(*) FROM devices {clause}", params).fetchone()  # noqa: S608
        return int(row[0])

    def list_batches(self) -> list[Batch]:
        """All batches, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches ORDER BY created_at, id"  # noqa: S608
            ).fetchall()
        return [batch_from_row(r) for r in rows]

    def get_batch(self, batch_id: str) -> Batch | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?",  # noqa: S608
                (batch_id,),
            ).fetchone()
        return None if row is None else batch_from_row(row)

    def batch_counts(self, batch_id: str, now: datetime) -> dict[str, int]:
        """Devices of a batch by situation; the first five are disjoint and sum to 'total'.

        provisioned: waiting to enroll with a still-valid token (or no token: IDevID);
        token_expired: waiting, but the token has expired; enrolled: state 'active'.
        """
        now_s = ts(now, "now")
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is None:
                raise UnknownBatch(batch_id)
            row = conn.execute(
                """SELECT
                    coalesce(sum(state = 'provisioned'
                        AND (token_expires_at IS NULL OR token_expires_at > :now)), 0),
                    coalesce(sum(state = 'provisioned' AND token_expires_at <= :now), 0),
                    coalesce(sum(state = 'active'), 0),
                    coalesce(sum(state = 'suspended'), 0),
                    coalesce(sum(state = 'revoked'), 0),
                    count(*)
                FROM devices WHERE batch_id = :batch""",
                {"now": now_s, "batch": batch_id},
            ).fetchone()
        keys = ("provisioned", "token_expired", "enrolled", "suspended", "revoked", "total")
        return {k: int(v) for k, v in zip(keys, row, strict=True)}

    # ------------------------------------------------------------------ tokens

    def add_token(
        self,
        device_id: DeviceId,
        token_hash: str,
        expires_at: datetime,
        now: datetime,
        *,
        actor: str = "registry",
    ) -> None:
        """Record a new one-time token for a device; any unused earlier token dies (reissue)."""
        check_sha256_hex("token hash", token_hash)
        now_s = ts(now, "now")
        expires_s = ts(expires_at, "token expiry")
        with self._write() as conn:
            state = self._state_of(conn, device_id)
            if state is None:
                raise UnknownDevice(device_id)
            if state is DeviceState.REVOKED:
                raise DeviceNotActive(device_id, state.value)
            # A reissued token replaces the old one: mark the old one used so it cannot enroll.
            killed = conn.execute(
                "UPDATE tokens SET used_at = ? WHERE device_id = ? AND used_at IS NULL",
                (now_s, device_id.value),
            ).rowcount
            try:
                conn.execute(
                    "INSERT INTO tokens (token_hash, device_id, created_at, expires_at) "
                    "VALUES (?, ?, ?, ?)",
                    (token_hash, device_id.value, now_s, expires_s),
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateToken(device_id) from exc
            conn.execute(
                "UPDATE devices SET token_expires_at = ?, updated_at = ? WHERE id = ?",
                (expires_s, now_s, device_id.value),
            )
            self._audit(
                conn,
                now_s,
                actor,
                "token.issue",
                device_id,
                {"expires_at": expires_s, "replaced": killed},
            )

    def check_token(self, device_id: DeviceId, token_hash: str, now: datetime) -> None:
        """Raise TokenRejected unless the token is this device's, unused and unexpired.

        Read-only: the token is consumed only by record_issuance, atomically with issuance.
        """
        now_s = ts(now, "now")
        with self._read() as conn:
            problem = self._token_problem(conn, device_id, token_hash, now_s)
        if problem is not None:
            raise TokenRejected(device_id, problem)

    # ------------------------------------------------------------------ issuance

    def record_issuance(
        self,
        cert: IssuedCertificate,
        *,
        consume_token_hash: str | None,
        supersedes_serial: int | None,
        now: datetime,
        actor: str,
    ) -> None:
        """Record an issued certificate, atomically with consuming the enrollment token.

        Of two concurrent requests with the same token exactly one succeeds: the conditional
        UPDATE below runs under the write lock, so the second sees used_at already set.
        """
        now_s = ts(now, "now")
        device_id = cert.device_id
        with self._write() as conn:
            if consume_token_hash is not None:
                consumed = conn.execute(
                    "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND device_id = ? "
                    "AND used_at IS NULL AND expires_at > ?",
                    (now_s, consume_token_hash, device_id.value, now_s),
                ).rowcount
                if consumed != 1:
                    problem = self._token_problem(conn, device_id, consume_token_hash, now_s)
                    raise TokenRejected(device_id, problem or "used")
            state = self._state_of(conn, device_id)
            if state is None:
                raise UnknownDevice(device_id)
            if state in (DeviceState.REVOKED, DeviceState.SUSPENDED):
                raise DeviceNotActive(device_id, state.value)
            try:
                conn.execute(
                    f"INSERT INTO certificates ({CERTIFICATE_COLUMNS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, 'active', NULL, NULL, ?)",
                    (
                        serial_hex(cert.serial),
                        device_id.value,
                        cert.fingerprint_sha256,
                        ts(cert.not_before, "not_before"),
                        ts(cert.not_after, "not_after"),
                        now_s,
                        cert.pem,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                if "fingerprint" in str(exc):
                    raise DuplicateFingerprint(cert.fingerprint_sha256) from exc
                raise DuplicateSerial(cert.serial) from exc
            if supersedes_serial is not None:
                old = conn.execute(
                    "SELECT status FROM certificates WHERE serial = ? AND device_id = ?",
                    (serial_hex(supersedes_serial), device_id.value),
                ).fetchone()
                if old is None:
                    raise UnknownCertificate(supersedes_serial, device_id)
                conn.execute(
                    "UPDATE certificates SET status = 'superseded' "
                    "WHERE serial = ? AND status = 'active'",
                    (serial_hex(supersedes_serial),),
                )
            conn.execute(
                "UPDATE devices SET state = 'active', enrolled_at = coalesce(enrolled_at, ?), "
                "updated_at = ? WHERE id = ?",
                (now_s, now_s, device_id.value),
            )
            self._audit(
                conn,
                now_s,
                actor,
                "certificate.issue",
                device_id,
                {
                    "serial": serial_hex(cert.serial),
                    "not_after": ts(cert.not_after),
                    "supersedes": None
                    if supersedes_serial is None
                    else serial_hex(supersedes_serial),
                    "with_token": consume_token_hash is not None,
                },
            )
            self._event(conn, now_s, EventKind.ISSUED, device_id, [cert.serial])

    def get_certificate(self, serial: int) -> CertificateRecord | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE serial = ?",  # noqa: S608
                (serial_hex(serial),),
            ).fetchone()
        return None if row is None else certificate_from_row(row)

    def certificates_of(self, device_id: DeviceId) -> list[CertificateRecord]:
        """A device's certificates, oldest issuance first."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE device_id = ? "  # noqa: S608
                "ORDER BY issued_at, serial",
                (device_id.value,),
            ).fetchall()
        return [certificate_from_row(r) for r in rows]

    # ------------------------------------------------------------------ revocation

    def revoke_device(
        self, device_id: DeviceId, *, reason: str, now: datetime, actor: str
    ) -> list[int]:
        """Revoke a device and every unexpired certificate of it; returns the serials revoked.

        `reason` is an RFC 5280 5.3.1 name ('keyCompromise'; 'key-compromise' is accepted).
        Superseded certificates are revoked too: a renewal does not make the old certificate
        invalid, so after a key compromise it must go on the CRL as well.
        """
        reason_v = self._revoke_reason(reason)
        now_s = ts(now, "now")
        with self._write() as conn:
            if self._state_of(conn, device_id) is None:
                raise UnknownDevice(device_id)
            revoked = self._revoke_in_tx(conn, [device_id.value], reason_v, now_s, actor, {})
        return revoked[device_id.value]

    @staticmethod
    def _revoke_reason(reason: str) -> str:
        reason_v = parse_reason(reason)
        if reason_v not in REVOKE_REASONS:
            raise InvalidValue(
                "revocation reason", reason, "use suspend/resume for certificateHold"
            )
        return reason_v

    def _revoke_in_tx(
        self,
        conn: sqlite3.Connection,
        device_ids: list[str],
        reason: str,
        now_s: str,
        actor: str,
        detail: dict[str, Any],
    ) -> dict[str, list[int]]:
        """Revoke devices and their unexpired certificates; serials revoked per device id.

        Set-based (the ids travel as one JSON array) so that revoke_batch costs a handful
        of statements per chunk rather than per device.
        """
        ids_json = json.dumps(device_ids)
        rows = conn.execute(
            "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
            "WHERE device_id IN (SELECT value FROM json_each(?)) "
            "AND status IN ('active', 'on_hold', 'superseded') AND not_after > ? "
            "RETURNING device_id, serial",
            (now_s, reason, ids_json, now_s),
        ).fetchall()
        serials: dict[str, list[int]] = {d: [] for d in device_ids}
        for device, serial in rows:
            serials[device].append(serial_int(serial))
        for found in serials.values():
            found.sort()
        conn.execute(
            "UPDATE devices SET state = 'revoked', updated_at = ? "
            "WHERE id IN (SELECT value FROM json_each(?))",
            (now_s, ids_json),
        )
        conn.executemany(
            "INSERT INTO audit (at, actor, action, device_id, detail) "
            "VALUES (?, ?, 'device.revoke', ?, ?)",
            [
                (
                    now_s,
                    actor,
                    device,
                    detail_json(
                        {"reason": reason, "serials": [serial_hex(s) for s in found], **detail}
                    ),
                )
                for device, found in serials.items()
            ],
        )
        # Always emitted, even with no certificate changed: the broker drops sessions by
        # device id, and a repeated revoke must still cut off anything still connected.
        conn.executemany(
            "INSERT INTO events (at, kind, device_id, serials) VALUES (?, 'revoked', ?, ?)",
            [(now_s, device, serials_json(found)) for device, found in serials.items()],
        )
        return serials

    def suspend_device(self, device_id: DeviceId, *, now: datetime, actor: str) -> list[int]:
        """Put a device's active certificates on hold (RFC 5280 certificateHold); reversible."""
        now_s = ts(now, "now")
        with self._write() as conn:
            state = self._state_of(conn, device_id)
            if state is None:
                raise UnknownDevice(device_id)
            if state is DeviceState.REVOKED:
                raise DeviceNotActive(device_id, state.value)
            if state is DeviceState.SUSPENDED:
                return []
            rows = conn.execute(
                "UPDATE certificates SET status = 'on_hold', revoked_at = ?, "
                "revocation_reason = 'certificateHold' "
                "WHERE device_id = ? AND status = 'active' AND not_after > ? RETURNING serial",
                (now_s, device_id.value, now_s),
            ).fetchall()
            serials = sorted(serial_int(r[0]) for r in rows)
            conn.execute(
                "UPDATE devices SET state = 'suspended', updated_at = ? WHERE id = ?",
                (now_s, device_id.value),
            )
            self._audit(
                conn,
                now_s,
                actor,
                "device.suspend",
                device_id,
                {"serials": [serial_hex(s) for s in serials], "previous_state": state.value},
            )
            self._event(conn, now_s, EventKind.SUSPENDED, device_id, serials)
        return serials

    def resume_device(self, device_id: DeviceId, *, now: datetime, actor: str) -> list[int]:
        """Lift a suspension: on-hold certificates become active again (RFC 5280
        removeFromCRL: they simply leave the next full CRL)."""
        now_s = ts(now, "now")
        with self._write() as conn:
            state = self._state_of(conn, device_id)
            if state is None:
                raise UnknownDevice(device_id)
            if state is DeviceState.REVOKED:
                raise DeviceNotActive(device_id, state.value)
            if state is not DeviceState.SUSPENDED:
                return []
            rows = conn.execute(
                "UPDATE certificates SET status = 'active', revoked_at = NULL, "
                "revocation_reason = NULL WHERE device_id = ? AND status = 'on_hold' "
                "RETURNING serial",
                (device_id.value,),
            ).fetchall()
            serials = sorted(serial_int(r[0]) for r in rows)
            # A device suspended before it ever enrolled goes back to waiting for enrollment.
            conn.execute(
                "UPDATE devices SET updated_at = ?, state = CASE WHEN enrolled_at IS NULL "
                "THEN 'provisioned' ELSE 'active' END WHERE id = ?",
                (now_s, device_id.value),
            )
            self._audit(
                conn,
                now_s,
                actor,
                "device.resume",
                device_id,
                {"serials": [serial_hex(s) for s in serials]},
            )
            self._event(conn, now_s, EventKind.RESUMED, device_id, serials)
        return serials

    def revoke_batch(
        self,
        batch_id: str,
        *,
        reason: str,
        now: datetime,
        actor: str,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Revoke every not-yet-revoked device of a batch; returns how many were revoked.

        Runs as a series of short transactions (_REVOKE_CHUNK devices each), so other
        processes keep working meanwhile; `progress` gets the running total after each.
        """
        reason_v = self._revoke_reason(reason)
        now_s = ts(now, "now")
        if self.get_batch(batch_id) is None:
            raise UnknownBatch(batch_id)
        total = 0
        while True:
            with self._write() as conn:
                ids = [
                    r[0]
                    for r in conn.execute(
                        # IN, not "!= 'revoked'": an index range per state, so revoked
                        # devices of earlier chunks are never scanned again.
                        "SELECT id FROM devices WHERE batch_id = ? "
                        "AND state IN ('provisioned', 'active', 'suspended') LIMIT ?",
                        (batch_id, _REVOKE_CHUNK),
                    )
                ]
                if ids:
                    self._revoke_in_tx(conn, ids, reason_v, now_s, actor, {"batch_id": batch_id})
                else:
                    self._audit(
                        conn,
                        now_s,
                        actor,
                        "batch.revoke",
                        None,
                        {"batch_id": batch_id, "reason": reason_v, "devices": total},
                    )
                    break
            total += len(ids)
            if progress is not None:
                progress(total)
        return total

    def revoked_entries(self, now: datetime) -> list[RevokedEntry]:
        """CRL input (RFC 5280 5.3): revoked and on-hold certificates not yet expired.

        Expired certificates leave the CRL (RFC 5280 3.3 allows it; nobody can use them).
        """
        now_s = ts(now, "now")
        with self._read() as conn:
            rows = conn.execute(
                "SELECT serial, revoked_at, revocation_reason FROM certificates "
                "WHERE status IN ('revoked', 'on_hold') AND not_after > ?",
                (now_s,),
            ).fetchall()
        return [
            RevokedEntry(serial=serial_int(r[0]), revoked_at=parse_ts(r[1]), reason=r[2])
            for r in rows
        ]

    def crl_number_next(self) -> int:
        """The next cRLNumber (RFC 5280 5.2.3: monotonically increasing), persisted."""
        with self._write() as conn:
            row = conn.execute(
                "UPDATE counters SET value = value + 1 WHERE name = 'crl_number' RETURNING value"
            ).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ events & audit

    def events_since(self, seq: int, *, limit: int = 10_000) -> list[Event]:
        """Events with seq > `seq`, oldest first (a rowid range scan: cheap to poll often)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (seq, limit),
            ).fetchall()
        return [event_from_row(r) for r in rows]

    def last_event_seq(self) -> int:
        with self._read() as conn:
            row = conn.execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def audit_log(self, *, device_id: DeviceId | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` audit entries (of one device, if given), newest first."""
        with self._read() as conn:
            if device_id is None:
                rows = conn.execute(
                    f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT ?",  # noqa: S608
                    (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {AUDIT_COLUMNS} FROM audit WHERE device_id = ? "  # noqa: S608
                    "ORDER BY seq DESC LIMIT ?",
                    (device_id.value, limit),
                ).fetchall()
        return [audit_from_row(r) for r in rows]

    def append_audit(
        self,
        *,
        actor: str,
        action: str,
        device_id: DeviceId | None,
        detail: dict[str, Any],
        now: datetime,
    ) -> None:
        now_s = ts(now, "now")
        with self._write() as conn:
            self._audit(conn, now_s, actor, action, device_id, detail)

    # ------------------------------------------------------------------ admin tokens

    def add_admin_token(
        self, token_hash: str, name: str, now: datetime, *, actor: str = "registry"
    ) -> None:
        """Record SHA-256(admin token); the token itself is never stored."""
        check_sha256_hex("admin token hash", token_hash)
        now_s = ts(now, "now")
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO admin_tokens (token_hash, name, created_at) VALUES (?, ?, ?)",
                    (token_hash, name, now_s),
                )
            except sqlite3.IntegrityError as exc:
                raise InvalidValue("admin token", name, "that token is already registered") from exc
            self._audit(conn, now_s, actor, "admin_token.add", None, {"name": name})

    def admin_token_valid(self, token_hash: str) -> bool:
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM admin_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return row is not None
