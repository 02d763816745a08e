"""Registry part for certificates: issuance, suspension, revocation and CRL input."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from enroll_server.registry.codec import (
    CERTIFICATE_COLUMNS,
    certificate_from_row,
    detail_json,
    parse_ts,
    serial_hex,
    serial_int,
    serials_json,
    ts,
)
from enroll_server.registry.connection import RegistryBase
from enroll_server.registry.errors import (
    DeviceNotActive,
    DuplicateSerial,
    InvalidValue,
    RegistryError,
    TokenRejected,
    UnknownBatch,
    UnknownCertificate,
    UnknownDevice,
)
from enroll_server.registry.models import (
    REVOKE_REASONS,
    CertificateRecord,
    DeviceState,
    EventKind,
    Issuance,
    IssuedCertificate,
    RevokedEntry,
    parse_reason,
)
from fleetpki.identity import DeviceId

# The f-string queries marked `noqa: S608` only interpolate the constant column lists of
# codec.py (and fixed WHERE fragments); every value goes through a `?` parameter.

# Devices revoked per transaction in revoke_batch: keeps each write lock hold short so the
# server and the broker are never starved while an operator revokes a whole batch.
_REVOKE_CHUNK = 500


def _issue_detail(
    serial_s: str, not_after_s: str, supersedes_s: str | None, with_token: bool
) -> str:
    """detail_json() of a certificate.issue audit entry, formatted directly (hot path).

    Every value is lowercase hex, a fixed-format timestamp, null or a boolean, so nothing
    needs escaping; test_registry checks the result equals detail_json of the same dict.
    """
    supersedes = "null" if supersedes_s is None else f'"{supersedes_s}"'
    return (
        f'{{"not_after": "{not_after_s}", "serial": "{serial_s}", '
        f'"supersedes": {supersedes}, "with_token": {"true" if with_token else "false"}}}'
    )


class _Refused(Exception):
    """The batched statements refused some row: roll back and redo one by one."""


def _batchable(batch: Sequence[Issuance]) -> bool:
    """Whether the executemany path applies: no renewals, no token spent twice in the batch."""
    tokens = [i.consume_token_hash for i in batch if i.consume_token_hash is not None]
    return len(set(tokens)) == len(tokens) and all(i.supersedes_serial is None for i in batch)


class CertificateStore(RegistryBase):
    """Issued certificates: issuance (with token consumption), suspension, revocation, CRL."""

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
        UPDATE runs under the write lock, so the second sees used_at already set. Raises the
        RegistryError that refused it (TokenRejected, DeviceNotActive, ...).
        """
        item = Issuance(cert, consume_token_hash, supersedes_serial, now, actor)
        refused = self.record_issuances([item])[0]
        if refused is not None:
            raise refused

    def record_issuances(
        self, batch: Sequence[Issuance], *, wait: bool = True
    ) -> list[RegistryError | None]:
        """Record several issuances in one transaction (group commit); one outcome each.

        Each issuance is all-or-nothing on its own: one refused (its token spent meanwhile,
        its device revoked) leaves the others recorded, and its outcome is the RegistryError
        that refused it; None means recorded. Committing a batch at once is what makes the
        commit (the WAL write, and its sync) cheap per enrollment under load. An unexpected
        database error fails the whole call and records nothing; so does RegistryBusy, raised
        at once when `wait` is False and another connection holds the write lock.
        """
        if not batch:
            return []
        if _batchable(batch):
            with self._lock:
                try:
                    with self._write(wait=wait) as conn:
                        if not self._issue_many(conn, batch):
                            raise _Refused
                    return [None] * len(batch)
                except (_Refused, sqlite3.IntegrityError, InvalidValue):
                    pass  # rolled back: redo one by one below to find who was refused and why
        outcomes: list[RegistryError | None] = []
        with self._write(wait=wait) as conn:
            for item in batch:
                conn.execute("SAVEPOINT issue")
                try:
                    self._issue_one(conn, item)
                except RegistryError as exc:
                    conn.execute("ROLLBACK TO issue")
                    outcomes.append(exc)
                else:
                    outcomes.append(None)
                conn.execute("RELEASE issue")
        return outcomes

    @staticmethod
    def _issue_many(conn: sqlite3.Connection, batch: Sequence[Issuance]) -> bool:
        """The common case in one executemany per statement; False if any row was refused.

        Python-side cost per statement, not per row, is what this saves (the hot path of a
        busy enrollment server). Every refusal shows as a row count short of the batch size.
        """
        rows = []
        tokens = []
        for item in batch:
            cert = item.cert
            now_s = ts(item.now, "now")
            device = cert.device_id.value
            serial_s = serial_hex(cert.serial)
            not_after_s = ts(cert.not_after, "not_after")
            with_token = item.consume_token_hash is not None
            if with_token:
                tokens.append((now_s, item.consume_token_hash, device, now_s))
            rows.append(
                (
                    now_s,
                    device,
                    serial_s,
                    cert.fingerprint_sha256,
                    ts(cert.not_before, "not_before"),
                    not_after_s,
                    cert.pem,
                    item.actor,
                    _issue_detail(serial_s, not_after_s, None, with_token),
                )
            )
        if tokens:
            consumed = conn.executemany(
                "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND device_id = ? "
                "AND used_at IS NULL AND expires_at > ?",
                tokens,
            ).rowcount
            if consumed != len(tokens):
                return False
        activated = conn.executemany(
            "UPDATE devices SET state = 'active', enrolled_at = coalesce(enrolled_at, ?), "
            "updated_at = ? WHERE id = ? AND state IN ('provisioned', 'active')",
            [(r[0], r[0], r[1]) for r in rows],
        ).rowcount
        if activated != len(rows):
            return False
        conn.executemany(
            f"INSERT INTO certificates ({CERTIFICATE_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, 'active', NULL, NULL, ?)",
            [(r[2], r[1], r[3], r[4], r[5], r[0], r[6]) for r in rows],
        )
        conn.executemany(
            "INSERT INTO audit (at, actor, action, device_id, detail) "
            "VALUES (?, ?, 'certificate.issue', ?, ?)",
            [(r[0], r[7], r[1], r[8]) for r in rows],
        )
        return True

    def _issue_one(self, conn: sqlite3.Connection, item: Issuance) -> None:
        """One issuance inside the caller's transaction; raises the RegistryError refusing it."""
        cert = item.cert
        now_s = ts(item.now, "now")
        device_id = cert.device_id
        serial_s = serial_hex(cert.serial)
        not_after_s = ts(cert.not_after, "not_after")
        supersedes_serial = item.supersedes_serial
        supersedes_s = None if supersedes_serial is None else serial_hex(supersedes_serial)
        token = item.consume_token_hash
        detail = _issue_detail(serial_s, not_after_s, supersedes_s, token is not None)
        if token is not None:
            consumed = conn.execute(
                "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND device_id = ? "
                "AND used_at IS NULL AND expires_at > ?",
                (now_s, token, device_id.value, now_s),
            ).rowcount
            if consumed != 1:
                problem = self._token_problem(conn, device_id, token, now_s)
                raise TokenRejected(device_id, problem or "used")
        # The device state check rides on the UPDATE that activates the device.
        activated = conn.execute(
            "UPDATE devices SET state = 'active', enrolled_at = coalesce(enrolled_at, ?), "
            "updated_at = ? WHERE id = ? AND state IN ('provisioned', 'active')",
            (now_s, now_s, device_id.value),
        ).rowcount
        if activated != 1:
            state = self._state_of(conn, device_id)
            if state is None:
                raise UnknownDevice(device_id)
            raise DeviceNotActive(device_id, state.value)
        try:
            conn.execute(
                f"INSERT INTO certificates ({CERTIFICATE_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, 'active', NULL, NULL, ?)",
                (
                    serial_s,
                    device_id.value,
                    cert.fingerprint_sha256,
                    ts(cert.not_before, "not_before"),
                    not_after_s,
                    now_s,
                    cert.pem,
                ),
            )
        except sqlite3.IntegrityError as exc:
            # The serial PRIMARY KEY: the one uniqueness the table keeps (schema 4).
            raise DuplicateSerial(cert.serial) from exc
        if supersedes_serial is not None:
            old = conn.execute(
                "SELECT status FROM certificates WHERE serial = ? AND device_id = ?",
                (supersedes_s, device_id.value),
            ).fetchone()
            if old is None:
                raise UnknownCertificate(supersedes_serial, device_id)
            conn.execute(
                "UPDATE certificates SET status = 'superseded' "
                "WHERE serial = ? AND status = 'active'",
                (supersedes_s,),
            )
        conn.execute(
            "INSERT INTO audit (at, actor, action, device_id, detail) "
            "VALUES (?, ?, 'certificate.issue', ?, ?)",
            (now_s, item.actor, device_id.value, detail),
        )

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
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is None:
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
