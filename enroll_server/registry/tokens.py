"""Registry part for enrollment tokens (hashes only, never the tokens)."""

from __future__ import annotations

from datetime import datetime

from enroll_server.registry.codec import parse_ts, ts
from enroll_server.registry.connection import RegistryBase, token_row_problem
from enroll_server.registry.errors import (
    TokenRejected,
)
from enroll_server.registry.models import (
    DeviceState,
    Role,
    TokenHolder,
    UnusedToken,
    check_sha256_hex,
)
from fleetpki.identity import DeviceId


class TokenStore(RegistryBase):
    """One-time enrollment tokens, stored as SHA-256 only (operator tokens: registry.operators)."""

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
            self._state_unless(conn, device_id, DeviceState.REVOKED)
            self._insert_token(conn, device_id, token_hash, expires_s, now_s, actor)

    def check_token(self, device_id: DeviceId, token_hash: str, now: datetime) -> None:
        """Raise TokenRejected unless the token is this device's, unused and unexpired.

        Read-only: the token is consumed only by record_issuance, atomically with issuance.
        """
        now_s = ts(now, "now")
        with self._read() as conn:
            problem = self._token_problem(conn, device_id, token_hash, now_s)
        if problem is not None:
            raise TokenRejected(device_id, problem)

    def check_token_holder(
        self, device_id: DeviceId, token_hash: str, now: datetime
    ) -> TokenHolder:
        """check_token, and the holder's role and state from the same single read.

        The enrollment hot path: one indexed SELECT instead of check_token + get_device.
        Raises TokenRejected exactly as check_token does; consumes nothing.
        """
        now_s = ts(now, "now")
        with self._read() as conn:
            row = conn.execute(
                "SELECT t.device_id, t.expires_at, t.used_at, d.role, d.state "
                "FROM tokens AS t JOIN devices AS d ON d.id = t.device_id "
                "WHERE t.token_hash = ?",
                (token_hash,),
            ).fetchone()
        problem = token_row_problem(row, device_id, now_s)
        if problem is not None:
            raise TokenRejected(device_id, problem)
        return TokenHolder(device_id, Role(row[3]), DeviceState(row[4]))

    def max_token_rowid(self) -> int:
        """The newest tokens row's rowid (0 for none): where unused_tokens can stop."""
        with self._read() as conn:
            row = conn.execute("SELECT max(rowid) FROM tokens").fetchone()
        return int(row[0] or 0)

    def unused_tokens(self, after_rowid: int, upto_rowid: int) -> list[UnusedToken]:
        """The unused tokens with after_rowid < rowid <= upto_rowid whose device may enroll
        (provisioned or active), in rowid order; expired ones included (the caller knows when
        it is). A range of rowids, not a LIMIT on the result: one call reads at most
        upto - after rows however many of them are spent (enroll_server.enrollment.token_index
        reads the table in such slices on the event loop)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT t.rowid, t.device_id, t.token_hash, t.expires_at, d.role "
                "FROM tokens AS t JOIN devices AS d ON d.id = t.device_id "
                "WHERE t.rowid > ? AND t.rowid <= ? AND t.used_at IS NULL "
                "AND d.state IN ('provisioned', 'active') ORDER BY t.rowid",
                (after_rowid, upto_rowid),
            ).fetchall()
        return [
            UnusedToken(int(r[0]), DeviceId(r[1]), r[2], parse_ts(r[3]), Role(r[4])) for r in rows
        ]
