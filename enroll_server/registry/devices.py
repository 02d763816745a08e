"""Registry part for devices and factory batches (all-or-nothing batch creation)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from enroll_server.registry.codec import (
    BATCH_COLUMNS,
    DEVICE_COLUMNS,
    batch_from_row,
    device_from_row,
    ts,
)
from enroll_server.registry.connection import RegistryBase, Sql, parse_enum
from enroll_server.registry.errors import (
    DuplicateBatch,
    DuplicateDevice,
    DuplicateToken,
    InvalidValue,
    UnknownBatch,
)
from enroll_server.registry.models import (
    Batch,
    BatchKind,
    Device,
    DeviceState,
    NewDevice,
    Role,
    check_sha256_hex,
)
from fleetpki.identity import DeviceId

# The f-string queries marked `noqa: S608` only interpolate the constant column lists of
# codec.py (and fixed WHERE fragments); every value goes through a `?` parameter.

# Rows per executemany() in create_batch: big enough to amortize the Python loop, small
# enough that a generator of 100k devices is never materialized at once.
_BATCH_CHUNK = 2000


class DeviceStore(RegistryBase):
    """Devices and factory batches."""

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
        manufacturer: str | None = None,
    ) -> int:
        """Register a factory batch and its devices, all or nothing; returns the device count.

        `manufacturer`: for an IDevID lot, the manufacturer CA whose birth certificates alone
        may enroll it (required for kind idevid, refused for token batches).

        A device id seen twice (in `devices` or already registered) raises DuplicateDevice
        and leaves the registry unchanged. `devices` is consumed lazily, in chunks.
        """
        batch_kind = parse_enum(BatchKind, "batch kind", kind)
        if token_ttl <= timedelta(0):
            raise InvalidValue("token ttl", token_ttl, "must be positive")
        if not batch_id:
            raise InvalidValue("batch id", batch_id, "must not be empty")
        if (manufacturer is None) != (batch_kind is BatchKind.TOKEN):
            raise InvalidValue(
                "manufacturer", manufacturer, "an IDevID lot names one, a token batch none"
            )
        now_s = ts(now, "now")
        default_expiry = ts(now + token_ttl)
        source = iter(devices)
        count = 0
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO batches (id, created_at, device_count, token_ttl_seconds, note, "
                    "kind, manufacturer) VALUES (?, ?, 0, ?, ?, ?, ?)",
                    (
                        batch_id,
                        now_s,
                        int(token_ttl.total_seconds()),
                        note,
                        batch_kind.value,
                        manufacturer,
                    ),
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
                try:
                    conn.executemany(
                        "INSERT INTO tokens (token_hash, device_id, created_at, expires_at) "
                        "VALUES (?, ?, ?, ?)",
                        token_rows,
                    )
                except sqlite3.IntegrityError as exc:
                    # Back to the savepoint first: PostgreSQL reads nothing more in a
                    # transaction a statement failed in.
                    conn.execute("ROLLBACK TO batch_chunk")
                    raise DuplicateToken(self._first_duplicate_token(conn, chunk)) from exc
                conn.execute("RELEASE batch_chunk")
                count += len(chunk)
            conn.execute("UPDATE batches SET device_count = ? WHERE id = ?", (count, batch_id))
            self._audit(
                conn,
                now_s,
                actor,
                "batch.create",
                None,
                {
                    "batch_id": batch_id,
                    "kind": batch_kind.value,
                    "devices": count,
                    "note": note,
                    **({"manufacturer": manufacturer} if manufacturer else {}),
                },
            )
        return count

    @staticmethod
    def _first_duplicate(conn: Sql, chunk: list[NewDevice]) -> DeviceId | None:
        seen: set[str] = set()
        for new in chunk:
            value = new.device_id.value
            exists = conn.execute("SELECT 1 FROM devices WHERE id = ?", (value,)).fetchone()
            if value in seen or exists is not None:
                return new.device_id
            seen.add(value)
        return None

    @staticmethod
    def _first_duplicate_token(conn: Sql, chunk: list[NewDevice]) -> DeviceId:
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
        role_v = parse_enum(Role, "role", role)
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
            params.append(parse_enum(DeviceState, "device state", state).value)
        if batch_id is not None:
            where.append("batch_id = ?")
            params.append(batch_id)
        if role is not None:
            where.append("role = ?")
            params.append(parse_enum(Role, "role", role).value)
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
            params.append(parse_enum(DeviceState, "device state", state).value)
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
                # count(*) FILTER: the same SQL on SQLite (3.30+) and PostgreSQL.
                """SELECT
                    count(*) FILTER (WHERE state = 'provisioned'
                        AND (token_expires_at IS NULL OR token_expires_at > ?)),
                    count(*) FILTER (WHERE state = 'provisioned' AND token_expires_at <= ?),
                    count(*) FILTER (WHERE state = 'active'),
                    count(*) FILTER (WHERE state = 'suspended'),
                    count(*) FILTER (WHERE state = 'revoked'),
                    count(*)
                FROM devices WHERE batch_id = ?""",
                (now_s, now_s, batch_id),
            ).fetchone()
        keys = ("provisioned", "token_expired", "enrolled", "suspended", "revoked", "total")
        return {k: int(v) for k, v in zip(keys, row, strict=True)}
