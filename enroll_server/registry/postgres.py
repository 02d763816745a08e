"""The registry's PostgreSQL connection (psycopg 3), shaped like the sqlite3 one the stores use.

The registry's parts run the same SQL on both backends: `?` placeholders, SQLite's
`json_each(?)` and errors as sqlite3 raises them (`sqlite3.IntegrityError` for a violated
constraint). PgConnection translates at this seam, so no store has a second copy of a query.

Writers are serialized as SQLite serializes them (BEGIN IMMEDIATE): every write transaction
first takes one transaction-scoped advisory lock. So a read-then-write inside a transaction
means the same on both, and an event's or a token's sequence number is also its commit order,
which is what pollers (`events_since`, the token index) rely on: with concurrent writers a
sequence value could commit after a higher one and a poller past it would never see it.
Readers never wait (each statement outside a transaction sees its own snapshot, as in WAL).

Any failure of the connection itself (PostgreSQL restarted, unreachable, a wrong password)
becomes RegistryUnavailable; a transaction it interrupted is rolled back by the server, and the
next use reconnects, so a node recovers by itself.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg
import psycopg.errors

from enroll_server.registry.errors import RegistryBusy, RegistryUnavailable
from enroll_server.registry.location import PostgresLocation, redact

# "fleetpki" in ASCII: the key of the advisory lock every write transaction holds.
WRITE_LOCK_KEY = 0x666C656574706B69
# Seconds a connection attempt may take before the registry counts as unavailable.
CONNECT_TIMEOUT_S = 5
_JSON_EACH = re.compile(r"json_each\(\?\)")
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """SQLite's dialect, as the stores write it, in PostgreSQL's (psycopg's %s placeholders)."""
    sql = sql.replace("%", "%%")
    sql = _JSON_EACH.sub("json_array_elements_text(?::json)", sql)
    return _NAMED.sub(r"%(\1)s", sql).replace("?", "%s")


class PgConnection:
    """One psycopg connection (autocommit; explicit BEGIN in `begin`), reconnected on demand."""

    def __init__(self, location: PostgresLocation) -> None:
        self.location = location
        self._conn: psycopg.Connection[Any] | None = None
        # A transaction whose connection broke: every statement fails until rollback().
        self._tx_lost = False
        self._in_tx = False
        self._trace: Callable[[str], object] | None = None
        self._live()

    # ------------------------------------------------------------------ connection

    def _live(self) -> psycopg.Connection[Any]:
        if self._tx_lost:
            raise RegistryUnavailable(str(self.location), "the connection broke mid-transaction")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            self._conn = psycopg.connect(
                self.location.url, autocommit=True, **_params(self.location)
            )
        except psycopg.Error as exc:
            raise RegistryUnavailable(str(self.location), _why(exc)) from None
        return self._conn

    def _lost(self, exc: psycopg.Error) -> RegistryUnavailable:
        """The connection failed under a statement: drop it (the next use reconnects)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._in_tx:
            self._tx_lost = True
        return RegistryUnavailable(str(self.location), _why(exc))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def set_trace_callback(self, trace: Callable[[str], object] | None) -> None:
        """Call `trace` with each statement as the registry wrote it (sqlite3's hook)."""
        self._trace = trace

    # ------------------------------------------------------------------ statements

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> psycopg.Cursor[Any]:
        """`params` by position (`?`) or by name (`:name`), as sqlite3 takes them."""
        if self._trace is not None:
            self._trace(sql)
        args = params if isinstance(params, dict) else tuple(params)
        conn = self._live()
        try:
            return conn.execute(translate(sql), args)
        except psycopg.Error as exc:
            error = self._convert(exc)
            if not isinstance(error, RegistryUnavailable) or self._in_tx:
                raise error from exc
        # The connection had died since its last use (PostgreSQL restarted meanwhile): outside
        # a transaction nothing was lost, so a new connection runs the statement once more.
        try:
            return self._live().execute(translate(sql), args)
        except psycopg.Error as exc:
            raise self._convert(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor[Any]:
        """rowcount is the sum over every row, as sqlite3's is.

        A plain multi-row INSERT (a factory batch: 100,000 devices and tokens) goes through
        COPY, about ten times faster than one INSERT a row; the same rows, the same errors.
        """
        if self._trace is not None:
            self._trace(sql)
        conn = self._live()
        cursor = conn.cursor()
        params = [tuple(r) for r in rows]
        plan = _copy_plan(sql) if len(params) >= COPY_MIN_ROWS else None
        try:
            if plan is None:
                cursor.executemany(translate(sql), params)
            else:
                table, columns, values = plan
                with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in params:
                        copy.write_row(_fill(values, row))
        except psycopg.Error as exc:
            raise self._convert(exc) from exc
        return cursor

    def _convert(self, exc: psycopg.Error) -> Exception:
        if isinstance(exc, psycopg.errors.IntegrityError):
            return sqlite3.IntegrityError(_sqlite_wording(exc))
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return RegistryBusy(str(self.location), 0)
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
            self._conn is not None and self._conn.closed
        ):
            return self._lost(exc)
        return exc

    # ------------------------------------------------------------------ transactions

    def begin(self, *, wait: bool, busy_ms: int) -> None:
        """BEGIN and the registry's write lock; RegistryBusy if another writer keeps it past
        `busy_ms` (at once when `wait` is False)."""
        self.execute("BEGIN")
        self._in_tx = True
        try:
            if wait:
                self.execute(f"SET LOCAL lock_timeout = {int(busy_ms)}")
                self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))
                return
            got = self.execute("SELECT pg_try_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))
            if got.fetchone()[0]:  # type: ignore[index]
                return
            raise RegistryBusy(str(self.location), 0)
        except RegistryBusy as exc:
            self.rollback()
            raise RegistryBusy(str(self.location), busy_ms if wait else 0) from exc
        except BaseException:
            self.rollback()
            raise

    def commit(self) -> None:
        try:
            self.execute("COMMIT")
        finally:
            self._in_tx = False
            self._tx_lost = False

    def rollback(self) -> None:
        lost, self._tx_lost, self._in_tx = self._tx_lost, False, False
        if lost or self._conn is None:
            return  # the server rolled it back when the connection went
        try:
            self.execute("ROLLBACK")
        except RegistryUnavailable:
            pass


# Rows from which executemany writes an INSERT with COPY instead.
COPY_MIN_ROWS = 64
_INSERT = re.compile(
    r"INSERT INTO (\w+) \(([\w, ]+)\) VALUES \(((?:\?|'[^']*'|NULL|-?\d+)"
    r"(?:, (?:\?|'[^']*'|NULL|-?\d+))*)\)",
)
_VALUE = re.compile(r"\?|'[^']*'|NULL|-?\d+")


@functools.lru_cache(maxsize=64)
def _copy_plan(sql: str) -> tuple[str, tuple[str, ...], tuple[object, ...]] | None:
    """(table, columns, values) of `INSERT INTO t (c, ...) VALUES (v, ...)` whose values are
    `?` or constants (a `?` is the marker object _PARAM); None for any other statement."""
    found = _INSERT.fullmatch(sql.strip())
    if found is None:
        return None
    columns = tuple(c.strip() for c in found.group(2).split(","))
    values: list[object] = []
    for token in _VALUE.findall(found.group(3)):
        if token == "?":
            values.append(_PARAM)
        elif token == "NULL":
            values.append(None)
        elif token.startswith("'"):
            values.append(token[1:-1])
        else:
            values.append(int(token))
    return (found.group(1), columns, tuple(values)) if len(values) == len(columns) else None


_PARAM = object()


def _fill(values: tuple[object, ...], row: tuple[Any, ...]) -> list[object]:
    """One COPY row: the statement's constants, and the row's parameters in place of `?`."""
    params = iter(row)
    return [next(params) if v is _PARAM else v for v in values]


_KEY_COLUMNS = re.compile(r"Key \(([^)]*)\)=")


def _sqlite_wording(exc: psycopg.Error) -> str:
    """SQLite's wording of a violated constraint (`UNIQUE constraint failed: table.column`),
    which the stores read to tell one uniqueness from another."""
    diag = exc.diag
    if isinstance(exc, psycopg.errors.UniqueViolation) and diag.table_name:
        found = _KEY_COLUMNS.match(diag.message_detail or "")
        columns = found.group(1).split(", ") if found else [diag.constraint_name or "?"]
        names = ", ".join(f"{diag.table_name}.{c}" for c in columns)
        return f"UNIQUE constraint failed: {names}"
    return str(exc).strip().splitlines()[0]


def _params(location: PostgresLocation) -> dict[str, Any]:
    """libpq parameters besides the URL: the password of `registry_password_file`, if any."""
    params: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "fleetpki"}
    password = location.password()
    if password is not None:
        params["password"] = password
    return params


def _why(exc: psycopg.Error) -> str:
    """libpq's message, first line, with any password in it redacted."""
    lines = str(exc).strip().splitlines()
    return redact(lines[0] if lines else type(exc).__name__)
