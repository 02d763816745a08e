"""Registry part for the CA state nodes share: numbered generations, the newest the truth.

What a generation holds is the home's business (home/ca_state.py: the CA files as JSON);
this part stores and reads them, and holds the lock that lets one process at a time change
the CA (`ca_state_lock`). On PostgreSQL a new generation NOTIFYs every node at its commit
(schema 10's trigger, registry/notify.py), as a revocation does.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from enroll_server.registry.codec import parse_ts, ts
from enroll_server.registry.connection import RegistryBase
from enroll_server.registry.errors import CaStateConflict, RegistryBusy

# "fleetcas" in ASCII: the session advisory lock of a CA change (never WRITE_LOCK_KEY, which
# the same process's registry writes take meanwhile).
CA_LOCK_KEY = 0x666C656574636173
# How long a CA change waits for another one (another node's `ca rollover`) to finish.
CA_LOCK_WAIT_S = 60.0
_LOCK_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class CaStateRow:
    generation: int
    recorded_at: datetime
    state: str  # JSON (home/ca_state.py)


class CaStateStore(RegistryBase):
    def ca_state_generation(self) -> int:
        """The newest generation recorded, 0 for none: what a node's poll compares."""
        with self._read() as conn:
            row = conn.execute("SELECT max(generation) FROM ca_states").fetchone()
        return int(row[0] or 0)

    def latest_ca_state(self) -> CaStateRow | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT generation, recorded_at, state FROM ca_states "
                "ORDER BY generation DESC LIMIT 1"
            ).fetchone()
        return None if row is None else CaStateRow(int(row[0]), parse_ts(row[1]), str(row[2]))

    def record_ca_state(self, generation: int, state: str, now: datetime) -> None:
        """Record `generation` (CaStateConflict if another process recorded it first)."""
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO ca_states (generation, recorded_at, state) VALUES (?, ?, ?)",
                    (generation, ts(now), state),
                )
        except sqlite3.IntegrityError:
            raise CaStateConflict(generation) from None

    @contextmanager
    def ca_state_lock(self) -> Iterator[None]:
        """Held while a process changes the CA: one change at a time across every node
        (PostgreSQL: a session advisory lock, let go when the block ends or the connection
        dies with its process). SQLite: one machine, the home's files are the truth: nothing.
        RegistryBusy after CA_LOCK_WAIT_S."""
        if not self.shared:
            yield
            return
        deadline = time.monotonic() + CA_LOCK_WAIT_S
        while True:
            with self._read() as conn:
                (got,) = conn.execute("SELECT pg_try_advisory_lock(?)", (CA_LOCK_KEY,)).fetchone()
            if got:
                break
            if time.monotonic() > deadline:
                raise RegistryBusy(f"{self.location} (CA change lock)", int(CA_LOCK_WAIT_S * 1000))
            time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            with self._read() as conn:
                conn.execute("SELECT pg_advisory_unlock(?)", (CA_LOCK_KEY,))
