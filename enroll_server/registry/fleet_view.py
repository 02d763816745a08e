"""Registry part for the operator console's reads: a page of devices, counts by state, the
audit log filtered, activity over a time window, certificates about to expire unrenewed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from enroll_server.registry.codec import (
    AUDIT_COLUMNS,
    DEVICE_COLUMNS,
    audit_from_row,
    device_from_row,
    parse_ts,
    serial_int,
    ts,
)
from enroll_server.registry.connection import RegistryBase, Sql, parse_enum
from enroll_server.registry.models import AuditEntry, Device, DeviceState
from fleetpki.identity import DeviceId

# The f-string queries marked `noqa: S608` only interpolate the constant column lists of
# codec.py and fixed WHERE fragments; every value goes through a `?` parameter.

# Device ids are letters, digits, '-' and '_' (fleetpki.identity): every id starting with a
# prefix sorts in [prefix, prefix + DEL), so a prefix search is a range scan of the primary key.
_ABOVE_ID_CHARS = "\x7f"


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """What the console's devices page asks for: an id prefix, a state, a batch, an order."""

    prefix: str = ""
    state: str | None = None
    batch_id: str | None = None
    descending: bool = False

    def where(self) -> tuple[str, list[Any]]:
        where, params = ["role = 'device'"], list[Any]()
        if self.prefix:
            where.append("id >= ? AND id < ?")
            params += [self.prefix, self.prefix + _ABOVE_ID_CHARS]
        if self.state is not None:
            where.append("state = ?")
            params.append(parse_enum(DeviceState, "device state", self.state).value)
        if self.batch_id is not None:
            where.append("batch_id = ?")
            params.append(self.batch_id)
        return " AND ".join(where), params


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """The audit page's filters; `before_seq` pages back through older entries."""

    actor: str | None = None
    action: str | None = None
    device_id: DeviceId | None = None
    since: datetime | None = None
    until: datetime | None = None
    before_seq: int | None = None


@dataclass(frozen=True, slots=True)
class ExpiringCertificate:
    device_id: DeviceId
    serial: int
    not_after: datetime


class FleetView(RegistryBase):
    """Reads for the console: each answers from an index, or one bounded scan."""

    def device_page(self, query: DeviceQuery, *, limit: int, offset: int) -> list[Device]:
        clause, params = query.where()
        order = "DESC" if query.descending else "ASC"
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {DEVICE_COLUMNS} FROM devices WHERE {clause} "  # noqa: S608
                f"ORDER BY id {order} LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [device_from_row(r) for r in rows]

    def device_total(self, query: DeviceQuery) -> int:
        clause, params = query.where()
        with self._read() as conn:
            row = conn.execute(f"SELECT count(*) FROM devices WHERE {clause}", params).fetchone()  # noqa: S608
        return int(row[0])

    def devices_by_state(self) -> dict[str, int]:
        """Devices (not services) per state; every state present, zero if none."""
        counts = {s.value: 0 for s in DeviceState}
        with self._read() as conn:
            rows = conn.execute(
                "SELECT state, count(*) FROM devices WHERE role = 'device' GROUP BY state"
            ).fetchall()
        counts.update({str(state): int(n) for state, n in rows})
        return counts

    @staticmethod
    def _first_seq_at(conn: Sql, table: str, at: datetime) -> int:
        """The first seq of `table` (audit or events) whose time is `at` or later: a binary
        search over the primary key (rows are appended in time order: seq is commit order
        and every writer passes its clock in), ~log2(rows) point reads, no index on time."""
        at_s = ts(at, "at")
        row = conn.execute(f"SELECT min(seq), max(seq) FROM {table}").fetchone()  # noqa: S608
        if row[0] is None:
            return 1
        lo, hi = int(row[0]), int(row[1]) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            found = conn.execute(
                f"SELECT seq, at FROM {table} WHERE seq >= ? ORDER BY seq LIMIT 1",  # noqa: S608
                (mid,),
            ).fetchone()
            if found is None or found[1] >= at_s:
                hi = mid
            else:
                lo = int(found[0]) + 1
        return lo

    def audit_search(self, query: AuditQuery, *, limit: int) -> list[AuditEntry]:
        """The newest `limit` audit entries matching every filter given, newest first."""
        where, params = ["1 = 1"], list[Any]()
        if query.actor:
            where.append("actor = ?")
            params.append(query.actor)
        if query.action:
            where.append("action = ?")
            params.append(query.action)
        if query.device_id is not None:
            where.append("device_id = ?")
            params.append(query.device_id.value)
        if query.before_seq is not None:
            where.append("seq < ?")
            params.append(query.before_seq)
        with self._read() as conn:
            if query.since is not None:
                where.append("seq >= ?")
                params.append(self._first_seq_at(conn, "audit", query.since))
            if query.until is not None:
                where.append("seq < ?")
                params.append(self._first_seq_at(conn, "audit", query.until))
            rows = conn.execute(
                f"SELECT {AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(where)} "  # noqa: S608
                "ORDER BY seq DESC LIMIT ?",
                [*params, limit],
            ).fetchall()
        return [audit_from_row(r) for r in rows]

    def audit_after(self, seq: int, *, limit: int = 200) -> list[AuditEntry]:
        """Audit entries after `seq`, oldest first (the console's live stream)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (seq, limit),
            ).fetchall()
        return [audit_from_row(r) for r in rows]

    def last_audit_seq(self) -> int:
        with self._read() as conn:
            row = conn.execute("SELECT max(seq) FROM audit").fetchone()
        return int(row[0] or 0)

    def audit_actions_since(
        self, since: datetime, actions: tuple[str, ...]
    ) -> list[tuple[datetime, str, str]]:
        """(time, action, detail JSON) of every audit entry since `since` with one of
        `actions`, oldest first: the overview's 24 h activity chart."""
        marks = ", ".join("?" for _ in actions)
        with self._read() as conn:
            first = self._first_seq_at(conn, "audit", since)
            rows = conn.execute(
                f"SELECT at, action, detail FROM audit WHERE seq >= ? AND action IN ({marks}) "  # noqa: S608
                "ORDER BY seq",
                [first, *actions],
            ).fetchall()
        return [(parse_ts(at), str(action), str(detail)) for at, action, detail in rows]

    def expiring_unrenewed(
        self, now: datetime, until: datetime, *, limit: int = 100
    ) -> tuple[list[ExpiringCertificate], int]:
        """Active certificates that expire between `now` and `until` and whose device holds no
        active certificate valid past `until` (it has not renewed): the first `limit` by
        expiry, and how many there are in all."""
        params = {"now": ts(now, "now"), "until": ts(until, "until")}
        body = (
            "FROM certificates c WHERE c.status = 'active' AND c.not_after > :now "
            "AND c.not_after <= :until AND NOT EXISTS (SELECT 1 FROM certificates n "
            "WHERE n.device_id = c.device_id AND n.status = 'active' AND n.not_after > :until)"
        )
        with self._read() as conn:
            total = int(conn.execute(f"SELECT count(*) {body}", params).fetchone()[0])
            rows = conn.execute(
                f"SELECT c.device_id, c.serial, c.not_after {body} "
                "ORDER BY c.not_after LIMIT :limit",
                {**params, "limit": limit},
            ).fetchall()
        found = [ExpiringCertificate(DeviceId(d), serial_int(s), parse_ts(a)) for d, s, a in rows]
        return found, total
