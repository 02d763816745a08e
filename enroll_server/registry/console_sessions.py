"""Registry part for web console sessions: who is logged in, kept where every node sees it.

A session row is keyed by the SHA-256 of its id (the id itself lives only in the browser's
cookie, as every other secret is kept here as a hash). The expiry policy (idle and absolute
timeouts, the cap) is the console's (webconsole/sessions.py); this part stores rows and
deletes the ones the caller names as expired, so any node may serve any click of a session
and a restart logs nobody out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from enroll_server.registry.codec import parse_ts, ts
from enroll_server.registry.connection import RegistryBase
from enroll_server.registry.errors import RegistryBusy
from enroll_server.registry.models import check_sha256_hex


@dataclass(frozen=True, slots=True)
class ConsoleSessionRow:
    operator_name: str
    token_hash: str  # SHA-256 of the operator token the session was opened with
    created_at: datetime
    last_seen: datetime


class ConsoleSessionStore(RegistryBase):
    def add_console_session(
        self,
        id_hash: str,
        row: ConsoleSessionRow,
        *,
        expired_before: tuple[datetime, datetime],
        keep_at_most: int,
    ) -> None:
        """Store a new session after deleting the expired ones (last seen before
        `expired_before[0]` or created before `[1]`) and, past `keep_at_most`, the least
        recently used: one transaction."""
        check_sha256_hex("console session id hash", id_hash)
        idle_before, created_before = (ts(t) for t in expired_before)
        with self._write() as conn:
            conn.execute(
                "DELETE FROM console_sessions WHERE last_seen < ? OR created_at < ?",
                (idle_before, created_before),
            )
            (count,) = conn.execute("SELECT count(*) FROM console_sessions").fetchone()
            excess = int(count) - keep_at_most + 1
            if excess > 0:
                conn.execute(
                    "DELETE FROM console_sessions WHERE id_hash IN (SELECT id_hash FROM "
                    "console_sessions ORDER BY last_seen, id_hash LIMIT ?)",
                    (excess,),
                )
            conn.execute(
                "INSERT INTO console_sessions (id_hash, operator_name, token_hash, "
                "created_at, last_seen) VALUES (?, ?, ?, ?, ?)",
                (
                    id_hash,
                    row.operator_name,
                    row.token_hash,
                    ts(row.created_at),
                    ts(row.last_seen),
                ),
            )

    def console_session(self, id_hash: str) -> ConsoleSessionRow | None:
        with self._read() as conn:
            found = conn.execute(
                "SELECT operator_name, token_hash, created_at, last_seen "
                "FROM console_sessions WHERE id_hash = ?",
                (id_hash,),
            ).fetchone()
        if found is None:
            return None
        name, token_hash, created, seen = found
        return ConsoleSessionRow(name, token_hash, parse_ts(created), parse_ts(seen))

    def touch_console_session(self, id_hash: str, now: datetime) -> bool:
        """Record a use of the session; False (nothing recorded) when another writer holds
        the registry: a click never waits for a batch to commit, and one missed touch only
        brings the idle timeout a little nearer."""
        try:
            with self._write(wait=False) as conn:
                conn.execute(
                    "UPDATE console_sessions SET last_seen = ? WHERE id_hash = ?",
                    (ts(now), id_hash),
                )
        except RegistryBusy:
            return False
        return True

    def end_console_session(self, id_hash: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (id_hash,))

    def console_session_count(self) -> int:
        with self._read() as conn:
            (count,) = conn.execute("SELECT count(*) FROM console_sessions").fetchone()
        return int(count)
