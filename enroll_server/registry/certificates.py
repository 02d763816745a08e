"""Registry part for issued certificates: lookups, and the rule of one current certificate per
identity (which certificate may renew, what a new one cuts off, when a fallback goes).

Recording an issuance is registry/issuance.py.
"""

from __future__ import annotations

from datetime import datetime

from enroll_server.registry.codec import (
    CERTIFICATE_COLUMNS,
    certificate_from_row,
    serial_hex,
    serial_int,
    ts,
)
from enroll_server.registry.connection import RegistryBase, Sql
from enroll_server.registry.errors import (
    CertificateNotCurrent,
    UnknownCertificate,
)
from enroll_server.registry.models import (
    CertificateRecord,
    CertStatus,
    EventKind,
)
from fleetpki.identity import DeviceId

# The f-string queries marked `noqa: S608` only interpolate the constant column lists of
# codec.py (and fixed WHERE fragments); every value goes through a `?` parameter.


class CertificateStore(RegistryBase):
    """Issued certificates: lookups, and the rule of one current certificate per identity."""

    def get_certificate(self, serial: int) -> CertificateRecord | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE serial = ?",  # noqa: S608
                (serial_hex(serial),),
            ).fetchone()
        return None if row is None else certificate_from_row(row)

    def certificates_of(self, device_id: DeviceId) -> list[CertificateRecord]:
        """A device's certificates, oldest issuance first."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE device_id = ? "  # noqa: S608
                "ORDER BY issued_at, serial",
                (device_id.value,),
            ).fetchall()
        return [certificate_from_row(r) for r in rows]

    def settle_certificate(
        self, serial: int, *, now: datetime, actor: str, wait: bool = True
    ) -> list[int]:
        """The first use of a renewed certificate: cut off its fallback; the serials cut off.

        Called when the broker admits the certificate (a renewal from it does the same in
        record_issuances). Nothing to do, and no write, for a certificate with no fallback.
        """
        now_s = ts(now, "now")
        serial_s = serial_hex(serial)
        with self._write(wait=wait) as conn:
            row = conn.execute(
                "SELECT device_id FROM certificates WHERE serial = ? AND status = 'active' "
                "AND fallback IS NOT NULL",
                (serial_s,),
            ).fetchone()
            if row is None:
                return []
            device_id = DeviceId(row[0])
            cut = revoke_rows(conn, device_id, keep=serial_s, reason="superseded", now_s=now_s)
            conn.execute("UPDATE certificates SET fallback = NULL WHERE serial = ?", (serial_s,))
            if cut:
                record_cut_off(conn, now_s, actor, device_id, cut, by=serial_s)
        return cut


def revoke_rows(
    conn: Sql,
    device_id: DeviceId,
    *,
    keep: str | None,
    reason: str,
    now_s: str,
) -> list[int]:
    """Revoke every not yet revoked certificate of `device_id` except serial `keep`; sorted
    serials. Expired ones too: nobody can use them, and the CRL leaves them out anyway."""
    rows = conn.execute(
        "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ?, "
        "fallback = NULL WHERE device_id = ? AND serial IS DISTINCT FROM ? "
        "AND status IN ('active', 'superseded', 'on_hold') RETURNING serial",
        (now_s, reason, device_id.value, keep),
    ).fetchall()
    return sorted(serial_int(r[0]) for r in rows)


def record_cut_off(
    conn: Sql,
    now_s: str,
    actor: str,
    device_id: DeviceId,
    serials: list[int],
    *,
    by: str,
) -> None:
    """Audit and announce certificates cut off because certificate `by` took over (RFC 5280
    5.3.1 superseded): the broker drops sessions presenting them, the CRL lists them."""
    RegistryBase._audit(
        conn,
        now_s,
        actor,
        "certificate.supersede",
        device_id,
        {"serials": [serial_hex(s) for s in serials], "reason": "superseded", "by": by},
    )
    RegistryBase._event(conn, now_s, EventKind.SUPERSEDED, device_id, serials)


def check_renewable(conn: Sql, serial: int, device_id: DeviceId) -> None:
    """Raise unless `serial` may renew: the identity's current certificate, or the fallback
    of a current certificate never used (the device lost it to a power cut)."""
    serial_s = serial_hex(serial)
    row = conn.execute(
        "SELECT status, revocation_reason FROM certificates WHERE serial = ? AND device_id = ?",
        (serial_s, device_id.value),
    ).fetchone()
    if row is None:
        raise UnknownCertificate(serial, device_id)
    status, reason = row
    if status == CertStatus.ACTIVE.value:
        return
    if status == CertStatus.SUPERSEDED.value:
        successor = conn.execute(
            "SELECT 1 FROM certificates WHERE device_id = ? AND status = 'active' AND fallback = ?",
            (device_id.value, serial_s),
        ).fetchone()
        if successor is not None:
            return
        reason = "superseded"
    raise CertificateNotCurrent(serial, device_id, status, reason)
