"""Console sessions: a login (an operator token) becomes a random session id held in a
cookie; the server keeps what it means, so logout and expiry end it here, not in the browser.

Sessions live in the serving process's memory: a restart logs everyone out (they log in again
with their token), and nothing about a session is ever written to disk. A session remembers
the SHA-256 of the token it was opened with and is checked against the registry's operators
at every request (sessions.current): a token rotated or an operator removed by any process
ends every session opened with it at the next click.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from enroll_server.home.layout import hash_secret
from enroll_server.registry import Operator, OperatorCredential

# OWASP Session Management Cheat Sheet: an idle timeout of minutes and an absolute one of hours.
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_TIMEOUT = timedelta(hours=8)
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """One logged-in browser. `csrf`: the token every POST form carries (sessions.csrf_ok)."""

    operator_name: str
    token_hash: str
    csrf: str
    created_at: datetime
    last_seen: datetime

    def expired(self, now: datetime) -> bool:
        return now - self.last_seen >= IDLE_TIMEOUT or now - self.created_at >= ABSOLUTE_TIMEOUT


@dataclass
class SessionStore:
    """Session id (only its SHA-256 is kept, as for every other secret) -> Session."""

    max_sessions: int = MAX_SESSIONS
    _by_hash: dict[str, Session] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._by_hash)

    def open(self, operator: Operator, token: str, now: datetime) -> tuple[str, Session]:
        """A new session for `operator`, who logged in with `token`: its id (for the cookie,
        nowhere else) and the session."""
        self._sweep(now)
        while len(self._by_hash) >= self.max_sessions:
            oldest = min(self._by_hash, key=lambda h: self._by_hash[h].last_seen)
            del self._by_hash[oldest]
        session_id = secrets.token_urlsafe(32)
        session = Session(operator.name, hash_secret(token), secrets.token_urlsafe(32), now, now)
        self._by_hash[hash_secret(session_id)] = session
        return session_id, session

    def current(
        self, session_id: str | None, credentials: list[OperatorCredential], now: datetime
    ) -> tuple[Session, Operator] | None:
        """The live session of this id and its operator as the registry has it now, or None
        (no such session, expired, or its operator removed or given a new token: then the
        session is ended here too)."""
        if not session_id:
            return None
        key = hash_secret(session_id)
        session = self._by_hash.get(key)
        if session is None:
            return None
        if session.expired(now):
            del self._by_hash[key]
            return None
        for credential in credentials:
            if credential.operator.name == session.operator_name and hmac.compare_digest(
                credential.token_hash, session.token_hash
            ):
                session.last_seen = now
                return session, credential.operator
        del self._by_hash[key]
        return None

    def close(self, session_id: str | None) -> None:
        """Logout: the id means nothing from now on, whatever the browser keeps."""
        if session_id:
            self._by_hash.pop(hash_secret(session_id), None)

    def _sweep(self, now: datetime) -> None:
        for key in [k for k, s in self._by_hash.items() if s.expired(now)]:
            del self._by_hash[key]


def csrf_ok(session: Session, submitted: str | None) -> bool:
    """Whether a POST carries its session's CSRF token (OWASP synchronizer token pattern),
    compared in constant time."""
    return submitted is not None and hmac.compare_digest(
        session.csrf.encode(), submitted.encode("utf-8", "replace")
    )
