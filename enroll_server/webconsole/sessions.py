"""Console sessions: a login (an operator token) becomes a random session id held in a
cookie; the server keeps what it means, so logout and expiry end it here, not in the browser.

Sessions live in the registry (registry/console_sessions.py), keyed by the SHA-256 of their
id: any node that shares the registry answers any click (no sticky sessions), and a restart
logs nobody out. A session remembers the SHA-256 of the token it was opened with and is
checked against the registry's operators at every request (SessionStore.current): a token
rotated or an operator removed by any process ends every session opened with it at the next
click. The CSRF token is derived from the session id (an HMAC, OWASP's "signed double-submit"
variant of the synchronizer token), so nothing more about a session needs storing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from enroll_server.home.layout import hash_secret
from enroll_server.registry import Operator, OperatorCredential
from enroll_server.registry.console_sessions import ConsoleSessionRow, ConsoleSessionStore

# OWASP Session Management Cheat Sheet: an idle timeout of minutes and an absolute one of hours.
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_TIMEOUT = timedelta(hours=8)
MAX_SESSIONS = 10_000
# A use is written to the registry at most this often per session: the idle timeout is
# minutes, so a minute of slack costs nothing and spares a write per click.
TOUCH_INTERVAL = timedelta(minutes=1)
_CSRF_LABEL = b"fleetpki console csrf"


@dataclass(frozen=True, slots=True)
class Session:
    """One logged-in browser. `csrf`: the token every POST form carries (csrf_ok)."""

    operator_name: str
    token_hash: str
    csrf: str
    created_at: datetime
    last_seen: datetime

    def expired(self, now: datetime) -> bool:
        return now - self.last_seen >= IDLE_TIMEOUT or now - self.created_at >= ABSOLUTE_TIMEOUT


def _csrf(session_id: str) -> str:
    return hmac.new(session_id.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def _session(session_id: str, row: ConsoleSessionRow) -> Session:
    return Session(
        row.operator_name, row.token_hash, _csrf(session_id), row.created_at, row.last_seen
    )


class SessionStore:
    """Console sessions kept in `registry`, at most `max_sessions` (the least recently used
    go first)."""

    def __init__(self, registry: ConsoleSessionStore, max_sessions: int = MAX_SESSIONS) -> None:
        self._registry = registry
        self.max_sessions = max_sessions

    def __len__(self) -> int:
        return self._registry.console_session_count()

    def open(self, operator: Operator, token: str, now: datetime) -> tuple[str, Session]:
        """A new session for `operator`, who logged in with `token`: its id (for the cookie,
        nowhere else) and the session."""
        session_id = secrets.token_urlsafe(32)
        row = ConsoleSessionRow(operator.name, hash_secret(token), now, now)
        self._registry.add_console_session(
            hash_secret(session_id),
            row,
            expired_before=(now - IDLE_TIMEOUT, now - ABSOLUTE_TIMEOUT),
            keep_at_most=self.max_sessions,
        )
        return session_id, _session(session_id, row)

    def current(
        self, session_id: str | None, credentials: list[OperatorCredential], now: datetime
    ) -> tuple[Session, Operator] | None:
        """The live session of this id and its operator as the registry has it now, or None
        (no such session, expired, or its operator removed or given a new token: then the
        session is ended here too)."""
        if not session_id:
            return None
        key = hash_secret(session_id)
        row = self._registry.console_session(key)
        if row is None:
            return None
        session = _session(session_id, row)
        if session.expired(now):
            self._registry.end_console_session(key)
            return None
        for credential in credentials:
            if credential.operator.name == session.operator_name and hmac.compare_digest(
                credential.token_hash, session.token_hash
            ):
                if now - session.last_seen >= TOUCH_INTERVAL:
                    self._registry.touch_console_session(key, now)
                return session, credential.operator
        self._registry.end_console_session(key)
        return None

    def close(self, session_id: str | None) -> None:
        """Logout: the id means nothing from now on, on every node, whatever the browser keeps."""
        if session_id:
            self._registry.end_console_session(hash_secret(session_id))


def csrf_ok(session: Session, submitted: str | None) -> bool:
    """Whether a POST carries its session's CSRF token (OWASP synchronizer token pattern),
    compared in constant time."""
    return submitted is not None and hmac.compare_digest(
        session.csrf.encode(), submitted.encode("utf-8", "replace")
    )
