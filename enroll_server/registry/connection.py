"""The registry's connection (SQLite, or PostgreSQL through registry.postgres): WAL setup, short
write transactions, shared SQL."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from enroll_server.registry.codec import detail_json, serials_json
from enroll_server.registry.errors import (
    DeviceNotActive,
    DuplicateToken,
    InvalidValue,
    RegistryBusy,
    UnknownDevice,
)
from enroll_server.registry.location import PostgresLocation, RegistryLocation
from enroll_server.registry.models import DeviceState, EventKind
from fleetpki.identity import DeviceId

if TYPE_CHECKING:  # psycopg is imported only when a PostgreSQL registry is opened
    from enroll_server.registry.postgres import PgConnection

BUSY_TIMEOUT_MS = 5000

_E = TypeVar("_E", bound=StrEnum)


def parse_enum(kind: type[_E], what: str, value: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidValue(what, value, f"expected one of {allowed}") from None


def enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    """Switch the file to WAL (https://www.sqlite.org/wal.html), retrying while another
    process holds it.

    Changing journal_mode can fail with SQLITE_BUSY at once, without consulting the busy
    handler, when several processes open a fresh file together; so retry with backoff up to
    the busy timeout. Once one process has switched, the mode is persistent in the file.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.002
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise RegistryBusy(str(path), BUSY_TIMEOUT_MS) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class Cursor(Protocol):
    """What a statement returns, on either backend."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Sql(Protocol):
    """The connection the registry's parts write SQL to: sqlite3's, or registry.postgres'
    PgConnection, which takes the same SQL (`?` placeholders) and raises the same errors."""

    def execute(self, sql: str, params: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, rows: Any, /) -> Cursor: ...


def _begin_immediate(conn: Sql, where: str, *, wait: bool) -> None:
    try:
        if wait:
            conn.execute("BEGIN IMMEDIATE")
        else:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("BEGIN IMMEDIATE")
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise RegistryBusy(where, BUSY_TIMEOUT_MS if wait else 0) from exc
        raise


class RegistryBase:
    """The connection, its lock and transactions, and SQL shared by the registry's parts.

    Every write is one short transaction that holds the registry's write lock from its start
    (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: an advisory lock, registry.postgres), so two
    writers never both read and then try to upgrade to writing (in WAL mode that upgrade fails
    with SQLITE_BUSY at once instead of waiting for busy_timeout). One instance may be shared
    by threads: a lock serializes use of its connection.
    """

    def __init__(self, conn: sqlite3.Connection | PgConnection, location: RegistryLocation) -> None:
        """Use Registry.open(location)."""
        self._conn: Sql = conn
        self._raw = conn
        self._location = location
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def location(self) -> RegistryLocation:
        return self._location

    @property
    def shared(self) -> bool:
        """Whether the registry is a database server other hosts may write to (PostgreSQL):
        then nothing read from it may be kept as the truth in one process's memory."""
        return isinstance(self._location, PostgresLocation)

    @property
    def path(self) -> Path:
        """The SQLite file (a PostgreSQL registry has none: check `shared` first)."""
        if isinstance(self._location, PostgresLocation):
            raise TypeError(f"registry {self._location} is not a file")
        return self._location.path

    def _sqlite(self) -> sqlite3.Connection:
        if not isinstance(self._raw, sqlite3.Connection):
            raise TypeError(f"registry {self._location} is not SQLite")
        return self._raw

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return str(self._sqlite().execute("PRAGMA journal_mode").fetchone()[0])

    @property
    def wal_autocheckpoint(self) -> int:
        """WAL pages past which a commit on this connection checkpoints by itself."""
        with self._lock:
            return int(self._sqlite().execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    @contextmanager
    def _write(self, *, wait: bool = True) -> Iterator[Sql]:
        """One write transaction holding the write lock, committed when the block ends.

        `wait=False`: if another connection holds the write lock, raise RegistryBusy at once
        instead of waiting up to the busy timeout (callers on an event loop retry later).
        """
        with self._lock:
            raw = self._raw
            if isinstance(raw, sqlite3.Connection):
                _begin_immediate(raw, str(self._location), wait=wait)
            else:
                raw.begin(wait=wait, busy_ms=BUSY_TIMEOUT_MS)
            try:
                yield raw
                raw.commit()
            except BaseException:
                if raw.in_transaction:
                    raw.rollback()
                raise

    @contextmanager
    def _read(self) -> Iterator[Sql]:
        # Outside a transaction each SELECT reads its own consistent snapshot (WAL; PostgreSQL
        # in autocommit).
        with self._lock:
            yield self._conn

    # ------------------------------------------------------------------ shared SQL

    @staticmethod
    def _state_of(conn: Sql, device_id: DeviceId) -> DeviceState | None:
        row = conn.execute("SELECT state FROM devices WHERE id = ?", (device_id.value,)).fetchone()
        return None if row is None else DeviceState(row[0])

    @classmethod
    def _state_unless(cls, conn: Sql, device_id: DeviceId, *refused: DeviceState) -> DeviceState:
        """The device's state: UnknownDevice if it has none, DeviceNotActive if `refused`."""
        state = cls._state_of(conn, device_id)
        if state is None:
            raise UnknownDevice(device_id)
        if state in refused:
            raise DeviceNotActive(device_id, state.value)
        return state

    @staticmethod
    def _audit(
        conn: Sql,
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
        conn: Sql, at: str, kind: EventKind, device_id: DeviceId, serials: list[int]
    ) -> None:
        conn.execute(
            "INSERT INTO events (at, kind, device_id, serials) VALUES (?, ?, ?, ?)",
            (at, kind.value, device_id.value, serials_json(serials)),
        )

    @staticmethod
    def _insert_token(
        conn: Sql,
        device_id: DeviceId,
        token_hash: str,
        expires_s: str,
        now_s: str,
        actor: str,
    ) -> None:
        """Record a new one-time token of a device; any unused earlier one dies (reissue)."""
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
        RegistryBase._audit(
            conn,
            now_s,
            actor,
            "token.issue",
            device_id,
            {"expires_at": expires_s, "replaced": killed},
        )

    @staticmethod
    def _token_problem(conn: Sql, device_id: DeviceId, token_hash: str, now_s: str) -> str | None:
        row = conn.execute(
            "SELECT device_id, expires_at, used_at FROM tokens WHERE token_hash = ?",
            (token_hash,),
        ).fetchone()
        return token_row_problem(row, device_id, now_s)


def token_row_problem(row: Any, device_id: DeviceId, now_s: str) -> str | None:
    """Why a token row (device_id, expires_at, used_at, ...) does not admit `device_id`."""
    if row is None:
        return "unknown"
    if row[0] != device_id.value:
        return "wrong-device"
    if row[2] is not None:
        return "used"
    if row[1] <= now_s:
        return "expired"
    return None
