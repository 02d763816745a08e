"""Registry part for the event feed (cross-process change notices) and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from enroll_server.registry.codec import (
    AUDIT_COLUMNS,
    EVENT_COLUMNS,
    audit_from_row,
    event_from_row,
    ts,
)
from enroll_server.registry.connection import RegistryBase
from enroll_server.registry.models import AuditEntry, Event
from fleetpki.identity import DeviceId

# The f-string queries marked `noqa: S608` only interpolate the constant column lists of
# codec.py (and fixed WHERE fragments); every value goes through a `?` parameter.


class Journal(RegistryBase):
    """The events other processes poll, and the append-only audit log."""

    def events_since(self, seq: int, *, limit: int = 10_000) -> list[Event]:
        """Events with seq > `seq`, oldest first (a rowid range scan: cheap to poll often)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (seq, limit),
            ).fetchall()
        return [event_from_row(r) for r in rows]

    def revocation_events_since(self, seq: int, *, limit: int = 10_000) -> tuple[list[Event], int]:
        """Events after `seq` other than 'issued', oldest first, and the seq to poll from next.

        For pollers that react to revocation, suspension and resumption only: the issuances in
        between are skipped by the partial index `events_changes`, not read and dropped. The
        next seq covers the skipped ones too; the high-water mark is read first, so an event
        committed meanwhile is left for the next poll, never lost.
        """
        with self._read() as conn:
            high = int(conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0)
            rows = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events "  # noqa: S608
                "WHERE kind <> 'issued' AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (seq, high, limit),
            ).fetchall()
        events = [event_from_row(r) for r in rows]
        if len(events) == limit:
            return events, events[-1].seq
        return events, max(seq, high)

    def last_event_seq(self) -> int:
        with self._read() as conn:
            row = conn.execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def audit_log(self, *, device_id: DeviceId | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` audit entries (of one device, if given), newest first."""
        with self._read() as conn:
            if device_id is None:
                rows = conn.execute(
                    f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT ?",  # noqa: S608
                    (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {AUDIT_COLUMNS} FROM audit WHERE device_id = ? "  # noqa: S608
                    "ORDER BY seq DESC LIMIT ?",
                    (device_id.value, limit),
                ).fetchall()
        return [audit_from_row(r) for r in rows]

    def append_audit(
        self,
        *,
        actor: str,
        action: str,
        device_id: DeviceId | None,
        detail: dict[str, Any],
        now: datetime,
    ) -> None:
        now_s = ts(now, "now")
        with self._write() as conn:
            self._audit(conn, now_s, actor, action, device_id, detail)
