"""Registry part for issuance: an issued certificate recorded atomically with its token.

One transaction per group commit (record_issuances): the executemany path when no item can
refuse another, else one SAVEPOINT per issuance, so that each gets its own outcome.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from enroll_server.registry.certificates import check_renewable, record_cut_off, revoke_rows
from enroll_server.registry.codec import CERTIFICATE_COLUMNS, serial_hex, ts
from enroll_server.registry.connection import RegistryBase, Sql
from enroll_server.registry.errors import (
    DeviceNotActive,
    DuplicateSerial,
    InvalidValue,
    RegistryError,
    TokenRejected,
    UnknownDevice,
)
from enroll_server.registry.models import Issuance, IssuedCertificate


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


# Whether any certificate of a device would be cut off by a new enrollment (_issue_many).
_CUT_OFF_PROBE = (
    "UPDATE certificates SET fallback = fallback WHERE device_id = ? "
    "AND status IN ('active', 'superseded', 'on_hold')"
)


class IssuanceStore(RegistryBase):
    """Recording issued certificates (with token consumption): one issuance, or a group."""

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
    def _issue_many(conn: Sql, batch: Sequence[Issuance]) -> bool:
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
                    cert.issuer_key_id,
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
        # A device enrolling again (a reissued token) has older certificates to cut off, with
        # an audit entry and an event each: the one-by-one path does that. For a first
        # enrollment this is one index probe that changes nothing.
        if conn.executemany(_CUT_OFF_PROBE, [(r[1],) for r in rows]).rowcount:
            return False
        conn.executemany(
            f"INSERT INTO certificates ({CERTIFICATE_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, 'active', NULL, NULL, ?, NULL, ?)",
            [(r[2], r[1], r[3], r[4], r[5], r[0], r[6], r[9]) for r in rows],
        )
        conn.executemany(
            "INSERT INTO audit (at, actor, action, device_id, detail) "
            "VALUES (?, ?, 'certificate.issue', ?, ?)",
            [(r[0], r[7], r[1], r[8]) for r in rows],
        )
        return True

    def _issue_one(self, conn: Sql, item: Issuance) -> None:
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
        if supersedes_s is not None:
            check_renewable(conn, supersedes_serial, device_id)  # type: ignore[arg-type]
        # One current certificate per identity. A renewal keeps the certificate it renews
        # from as the new one's fallback and cuts off everything else: the fallback of the
        # renewing certificate (whose use this is), or the unused successor of a fallback
        # renewing again (a power cut lost it). A token or birth-certificate enrollment
        # starts over with a new key: every older certificate goes.
        cut = revoke_rows(conn, device_id, keep=supersedes_s, reason="superseded", now_s=now_s)
        if supersedes_s is not None:
            conn.execute(
                "UPDATE certificates SET status = 'superseded', fallback = NULL WHERE serial = ?",
                (supersedes_s,),
            )
        try:
            conn.execute(
                f"INSERT INTO certificates ({CERTIFICATE_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, 'active', NULL, NULL, ?, ?, ?)",
                (
                    serial_s,
                    device_id.value,
                    cert.fingerprint_sha256,
                    ts(cert.not_before, "not_before"),
                    not_after_s,
                    now_s,
                    cert.pem,
                    supersedes_s,
                    cert.issuer_key_id,
                ),
            )
        except sqlite3.IntegrityError as exc:
            # The serial PRIMARY KEY: the one uniqueness the table keeps (schema 4).
            raise DuplicateSerial(cert.serial) from exc
        if cut:
            record_cut_off(conn, now_s, item.actor, device_id, cut, by=serial_s)
        conn.execute(
            "INSERT INTO audit (at, actor, action, device_id, detail) "
            "VALUES (?, ?, 'certificate.issue', ?, ?)",
            (now_s, item.actor, device_id.value, detail),
        )
