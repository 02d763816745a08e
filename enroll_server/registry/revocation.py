"""Registry part for revocation: devices, single certificates, batches, suspension, re-keying
and the CRL's input."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from enroll_server.registry.certificates import revoke_rows
from enroll_server.registry.codec import (
    detail_json,
    parse_ts,
    serial_hex,
    serial_int,
    serials_json,
    ts,
)
from enroll_server.registry.connection import RegistryBase, Sql
from enroll_server.registry.errors import (
    InvalidValue,
    UnknownBatch,
    UnknownCertificate,
    UnknownDevice,
)
from enroll_server.registry.models import (
    REVOKE_REASONS,
    DeviceState,
    EventKind,
    RevokedEntry,
    check_sha256_hex,
    parse_reason,
)
from fleetpki.identity import DeviceId

# Devices revoked per transaction in revoke_batch: keeps each write lock hold short so the
# server and the broker are never starved while an operator revokes a whole batch.
_REVOKE_CHUNK = 500


class RevocationStore(RegistryBase):
    """Revocation, suspension, re-keying and re-admission; CRL input."""

    def revoke_device(
        self, device_id: DeviceId, *, reason: str, now: datetime, actor: str
    ) -> list[int]:
        """Revoke a device and every unexpired certificate of it; returns the serials revoked.

        `reason` is an RFC 5280 5.3.1 name ('keyCompromise'; 'key-compromise' is accepted).
        The fallback of an unused renewal (status superseded) is revoked too.
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
                "revocation reason", reason, "use suspend and resume for certificate-hold"
            )
        return reason_v

    def _revoke_in_tx(
        self,
        conn: Sql,
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
        """Put every unexpired certificate of a device on hold (RFC 5280 5.3.1
        certificateHold), so CRL and OCSP list each; reversible with resume_device."""
        now_s = ts(now, "now")
        with self._write() as conn:
            state = self._state_unless(conn, device_id, DeviceState.REVOKED)
            if state is DeviceState.SUSPENDED:
                return []
            # Every certificate still valid, the fallback of an unused renewal included, or
            # mosquitto (which knows only the CRL) would keep admitting it.
            rows = conn.execute(
                "UPDATE certificates SET status = 'on_hold', revoked_at = ?, "
                "revocation_reason = 'certificateHold' WHERE device_id = ? "
                "AND status IN ('active', 'superseded') AND not_after > ? RETURNING serial",
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
            state = self._state_unless(conn, device_id, DeviceState.REVOKED)
            if state is not DeviceState.SUSPENDED:
                return []
            # Each held certificate gets its status back: the fallback of an unused renewal
            # (named by its successor) 'superseded', the others 'active'. Revoked ones stay.
            rows = conn.execute(
                "UPDATE certificates SET revoked_at = NULL, revocation_reason = NULL, "
                "status = CASE WHEN serial IN (SELECT fallback FROM certificates "
                "WHERE device_id = :device AND fallback IS NOT NULL) "
                "THEN 'superseded' ELSE 'active' END "
                "WHERE device_id = :device AND status = 'on_hold' RETURNING serial",
                {"device": device_id.value},
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

    def revoke_certificate(
        self, serial: int, *, reason: str, now: datetime, actor: str
    ) -> tuple[DeviceId, list[int]]:
        """Revoke one certificate; its identity stays registered. Returns the identity and the
        serials revoked (none if it was revoked already).

        Revoking an identity's current certificate also revokes its fallback (the certificate
        it was renewed from, kept only to stand in for it): the identity then has no valid
        certificate left and needs a re-key (rekey_device) to enroll again.
        """
        reason_v = self._revoke_reason(reason)
        now_s = ts(now, "now")
        serial_s = serial_hex(serial)
        with self._write() as conn:
            row = conn.execute(
                "SELECT device_id, status, fallback FROM certificates WHERE serial = ?",
                (serial_s,),
            ).fetchone()
            if row is None:
                raise UnknownCertificate(serial)
            device_id = DeviceId(row[0])
            if row[1] == "revoked":
                return device_id, []
            targets = [serial_s] if row[2] is None else [serial_s, row[2]]
            rows = conn.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?, "
                "revocation_reason = ?, fallback = NULL "
                "WHERE serial IN (SELECT value FROM json_each(?)) AND status <> 'revoked' "
                "RETURNING serial",
                (now_s, reason_v, json.dumps(targets)),
            ).fetchall()
            serials = sorted(serial_int(r[0]) for r in rows)
            self._audit(
                conn,
                now_s,
                actor,
                "certificate.revoke",
                device_id,
                {"serials": [serial_hex(s) for s in serials], "reason": reason_v},
            )
            self._event(conn, now_s, EventKind.CERT_REVOKED, device_id, serials)
        return device_id, serials

    def rekey_device(
        self,
        device_id: DeviceId,
        *,
        token_hash: str,
        token_expires_at: datetime,
        now: datetime,
        actor: str,
    ) -> list[int]:
        """Cut off every certificate of a device (RFC 5280 5.3.1 superseded) and give it a new
        one-time token, in one transaction; returns the serials revoked.

        The device goes back to 'provisioned': it enrolls anew with the token and a new key.
        Refused for a suspended device (resume it first) and a revoked one (readmit_device).
        """
        check_sha256_hex("token hash", token_hash)
        now_s = ts(now, "now")
        expires_s = ts(token_expires_at, "token expiry")
        with self._write() as conn:
            state = self._state_unless(conn, device_id, DeviceState.SUSPENDED, DeviceState.REVOKED)
            serials = revoke_rows(conn, device_id, keep=None, reason="superseded", now_s=now_s)
            conn.execute(
                "UPDATE devices SET state = 'provisioned', updated_at = ? WHERE id = ?",
                (now_s, device_id.value),
            )
            self._audit(
                conn,
                now_s,
                actor,
                "device.rekey",
                device_id,
                {"serials": [serial_hex(s) for s in serials], "previous_state": state.value},
            )
            self._insert_token(conn, device_id, token_hash, expires_s, now_s, actor)
            self._event(conn, now_s, EventKind.CERT_REVOKED, device_id, serials)
        return serials

    def readmit_device(
        self,
        device_id: DeviceId,
        *,
        token_hash: str | None,
        token_expires_at: datetime | None,
        now: datetime,
        actor: str,
    ) -> None:
        """Let a revoked device enroll again under its id with a new one-time token (a service
        identity, whose certificate the operator issues, needs none: `token_hash` None).

        Its revoked certificates stay revoked (CRL and OCSP list them until they expire): the
        device comes back only with a new key, through the token the operator hands over.
        """
        now_s = ts(now, "now")
        expires_s = None
        if token_hash is not None:
            check_sha256_hex("token hash", token_hash)
            if token_expires_at is None:
                raise InvalidValue("token expiry", None, "a token needs an expiry")
            expires_s = ts(token_expires_at, "token expiry")
        with self._write() as conn:
            self._state_unless(
                conn, device_id, *(s for s in DeviceState if s is not DeviceState.REVOKED)
            )
            reasons = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT revocation_reason FROM certificates "
                    "WHERE device_id = ? AND status = 'revoked' ORDER BY 1",
                    (device_id.value,),
                )
            ]
            conn.execute(
                "UPDATE devices SET state = 'provisioned', updated_at = ? WHERE id = ?",
                (now_s, device_id.value),
            )
            self._audit(
                conn, now_s, actor, "device.readmit", device_id, {"revocation_reasons": reasons}
            )
            if token_hash is not None and expires_s is not None:
                self._insert_token(conn, device_id, token_hash, expires_s, now_s, actor)

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

    def revoked_entries(
        self, now: datetime, issuer_key_id: str | None = None
    ) -> list[RevokedEntry]:
        """CRL input (RFC 5280 5.3): revoked and on-hold certificates not yet expired.

        Expired certificates leave the CRL (RFC 5280 3.3 allows it; nobody can use them).
        `issuer_key_id`: only that issuing CA's certificates (its own CRL, RFC 5280 5.1.2.3),
        with those from before schema 9 (NULL: the only issuer there was, until a rollover
        assigns them, assign_issuer); None: every certificate.
        """
        now_s = ts(now, "now")
        sql = (
            "SELECT serial, revoked_at, revocation_reason FROM certificates "
            "WHERE status IN ('revoked', 'on_hold') AND not_after > ?"
        )
        params: tuple[str, ...] = (now_s,)
        if issuer_key_id is not None:
            sql += " AND (issuer_key_id = ? OR issuer_key_id IS NULL)"
            params = (now_s, issuer_key_id)
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            RevokedEntry(serial=serial_int(r[0]), revoked_at=parse_ts(r[1]), reason=r[2])
            for r in rows
        ]

    def assign_issuer(self, issuer_key_id: str) -> int:
        """Record `issuer_key_id` as the issuer of every certificate from before schema 9
        (`fleetpki ca rollover`, before the new issuer signs anything); returns how many."""
        with self._write() as conn:
            return conn.execute(
                "UPDATE certificates SET issuer_key_id = ? WHERE issuer_key_id IS NULL",
                (issuer_key_id,),
            ).rowcount

    def issuer_last_expiry(self, issuer_key_id: str) -> datetime | None:
        """The latest notAfter among an issuing CA's certificates; None if it signed none."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT max(not_after) FROM certificates WHERE issuer_key_id = ?",
                (issuer_key_id,),
            ).fetchone()
        return None if row is None or row[0] is None else parse_ts(row[0])

    def unexpired_issued_by(self, issuer_key_id: str, now: datetime) -> list[int]:
        """Serials of an issuing CA's certificates not revoked and not yet expired."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT serial FROM certificates WHERE issuer_key_id = ? "
                "AND status <> 'revoked' AND not_after > ? ORDER BY serial",
                (issuer_key_id, ts(now, "now")),
            ).fetchall()
        return [serial_int(r[0]) for r in rows]

    def crl_number_next(self) -> int:
        """The next cRLNumber (RFC 5280 5.2.3: monotonically increasing), persisted."""
        with self._write() as conn:
            row = conn.execute(
                "UPDATE counters SET value = value + 1 WHERE name = 'crl_number' RETURNING value"
            ).fetchone()
        return int(row[0])
