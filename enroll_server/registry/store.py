"""Registry: the fleet registry on one SQLite file (WAL) or a PostgreSQL database, shared
safely by several processes (and, on PostgreSQL, by several hosts)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from enroll_server.registry.ca_state import CaStateStore
from enroll_server.registry.certificates import CertificateStore
from enroll_server.registry.connection import BUSY_TIMEOUT_MS, enable_wal
from enroll_server.registry.console_sessions import ConsoleSessionStore
from enroll_server.registry.devices import DeviceStore
from enroll_server.registry.fleet_view import FleetView
from enroll_server.registry.issuance import IssuanceStore
from enroll_server.registry.journal import Journal
from enroll_server.registry.location import (
    PostgresLocation,
    RegistryLocation,
    SqliteLocation,
    parse_location,
)
from enroll_server.registry.operators import OperatorStore
from enroll_server.registry.revocation import RevocationStore
from enroll_server.registry.schema import migrate, migrate_postgres
from enroll_server.registry.tokens import TokenStore

WAL_AUTOCHECKPOINT_PAGES = 10_000
WAL_SIZE_LIMIT = 64 * 1024 * 1024


class Registry(
    DeviceStore,
    TokenStore,
    IssuanceStore,
    CertificateStore,
    RevocationStore,
    OperatorStore,
    ConsoleSessionStore,
    CaStateStore,
    Journal,
    FleetView,
):
    """The fleet registry: devices, batches, tokens, certificates, operators, events, audit.

    The only place with SQL. Several processes (server, CLI, standalone broker; on
    PostgreSQL several nodes) may open the same registry: every write is one short
    transaction holding the write lock, readers never block writers, and changes other
    processes must react to go through `events_since`. Both backends run the same SQL.
    The methods live in one module per noun (devices, tokens, certificates, revocation,
    journal).
    """

    @classmethod
    def open(
        cls,
        location: Path | str | RegistryLocation,
        *,
        wal_autocheckpoint: int = WAL_AUTOCHECKPOINT_PAGES,
        create: bool = False,
        upgrade: bool = False,
    ) -> Registry:
        """Open the registry at `location`: an SQLite file (a Path, or a str that is no URL)
        or a PostgreSQL database (`postgresql://...`, or a PostgresLocation).

        SQLite: created if needed, switched to WAL and migrated, as always. `wal_autocheckpoint`:
        the WAL size, in pages, past which a commit on this connection checkpoints by itself
        (the server raises it for its event loop's connection and checkpoints in a thread
        instead: registry.checkpointer).

        PostgreSQL: the schema must be this fleetpki's (NoSchema, SchemaTooOld, SchemaTooNew
        otherwise), unless `create` (make it in an empty database: `fleetpki init`) or
        `upgrade` (apply missing migrations: `fleetpki registry migrate`). Raises
        RegistryUnavailable when the server cannot be reached or refuses the login.
        """
        if isinstance(location, str):
            location = parse_location(location)
        elif isinstance(location, Path):
            location = SqliteLocation(location)
        if isinstance(location, PostgresLocation):
            return cls._open_postgres(location, create=create, upgrade=upgrade)
        return cls._open_sqlite(location, wal_autocheckpoint)

    @classmethod
    def _open_postgres(cls, location: PostgresLocation, *, create: bool, upgrade: bool) -> Registry:
        from enroll_server.registry.postgres import PgConnection  # psycopg only when used

        conn = PgConnection(location)
        try:
            registry = cls(conn, location)
            with registry._write():
                migrate_postgres(conn, str(location), create=create, upgrade=upgrade)
        except BaseException:
            conn.close()
            raise
        return registry

    @classmethod
    def _open_sqlite(cls, location: SqliteLocation, wal_autocheckpoint: int) -> Registry:
        path = location.path
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Per connection, and a no-op inside a transaction: set before anything else.
            conn.execute("PRAGMA foreign_keys = ON")
            enable_wal(conn, path)
            # FULL: every commit syncs the WAL before it returns, so a certificate handed to a
            # device (or a revocation confirmed to an operator) is on disk before anyone hears
            # of it, power cut included. NORMAL only survives a crash of the process: a power
            # cut could take back the last commits, and with them certificates devices hold
            # (https://www.sqlite.org/pragma.html#pragma_synchronous). The server's commits
            # are grouped (enrollment/commit_queue), one sync per group: a commit of 15 took
            # 3-4 ms instead of ~1.1 ms on a shared VM's disk (BENCHMARKS.md, "kill -9 of serve").
            conn.execute("PRAGMA synchronous = FULL")
            # Checkpoint every ~40 MB of WAL instead of SQLite's 4 MB default: a checkpoint
            # copies each changed page back once however often it changed, so under a busy
            # enrollment load a larger interval writes far fewer pages per certificate (the
            # commit is the registry's main CPU cost, BENCHMARKS.md). The size limit truncates
            # a WAL that outgrew it once a checkpoint has emptied it.
            conn.execute(f"PRAGMA wal_autocheckpoint = {int(wal_autocheckpoint)}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            registry = cls(conn, location)
            with registry._write():
                migrate(conn)
        except BaseException:
            conn.close()
            raise
        return registry
