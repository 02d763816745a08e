"""Conversion between registry value types and their SQLite column encodings."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from enroll_server.registry.models import (
    AuditEntry,
    Batch,
    BatchKind,
    CertificateRecord,
    CertStatus,
    Device,
    DeviceState,
    Event,
    EventKind,
    Role,
    check_aware,
)
from fleetpki.identity import DeviceId

# Fixed width (always microseconds, always 'Z') so that string order is time order and
# SQL comparisons like `not_after > ?` are correct on the TEXT columns.
_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


_UTC_TEXT = "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ"


def ts(value: datetime, what: str = "timestamp") -> str:
    """A timezone-aware datetime as a sortable ISO-8601 UTC string (the form of _FORMAT)."""
    if value.tzinfo is not UTC:
        value = check_aware(what, value).astimezone(UTC)
    # Formatting the fields is 2.5x cheaper than isoformat() and 5x cheaper than strftime;
    # every enrollment formats five timestamps.
    return _UTC_TEXT % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def ts_opt(value: datetime | None, what: str = "timestamp") -> str | None:
    return None if value is None else ts(value, what)


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def parse_ts_opt(text: str | None) -> datetime | None:
    return None if text is None else parse_ts(text)


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def serial_int(text: str) -> int:
    return int(text, 16)


def device_from_row(row: tuple[Any, ...]) -> Device:
    # Column order: DEVICE_COLUMNS.
    return Device(
        device_id=DeviceId(row[0]),
        role=Role(row[1]),
        batch_id=row[2],
        state=DeviceState(row[3]),
        created_at=parse_ts(row[4]),
        updated_at=parse_ts(row[5]),
        enrolled_at=parse_ts_opt(row[6]),
        token_expires_at=parse_ts_opt(row[7]),
    )


DEVICE_COLUMNS = "id, role, batch_id, state, created_at, updated_at, enrolled_at, token_expires_at"


def batch_from_row(row: tuple[Any, ...]) -> Batch:
    return Batch(
        batch_id=row[0],
        created_at=parse_ts(row[1]),
        device_count=int(row[2]),
        token_ttl=timedelta(seconds=int(row[3])),
        note=row[4],
        kind=BatchKind(row[5]),
        manufacturer=row[6],
    )


BATCH_COLUMNS = "id, created_at, device_count, token_ttl_seconds, note, kind, manufacturer"


def certificate_from_row(row: tuple[Any, ...]) -> CertificateRecord:
    return CertificateRecord(
        serial=serial_int(row[0]),
        device_id=DeviceId(row[1]),
        fingerprint_sha256=row[2],
        not_before=parse_ts(row[3]),
        not_after=parse_ts(row[4]),
        issued_at=parse_ts(row[5]),
        status=CertStatus(row[6]),
        revoked_at=parse_ts_opt(row[7]),
        revocation_reason=row[8],
        pem=row[9],
        fallback_serial=None if row[10] is None else serial_int(row[10]),
        issuer_key_id=row[11],
    )


CERTIFICATE_COLUMNS = (
    "serial, device_id, fingerprint_sha256, not_before, not_after, issued_at, status, "
    "revoked_at, revocation_reason, pem, fallback, issuer_key_id"
)


def event_from_row(row: tuple[Any, ...]) -> Event:
    return Event(
        seq=int(row[0]),
        at=parse_ts(row[1]),
        kind=EventKind(row[2]),
        device_id=DeviceId(row[3]),
        serials=tuple(serial_int(s) for s in json.loads(row[4])),
    )


EVENT_COLUMNS = "seq, at, kind, device_id, serials"


def audit_from_row(row: tuple[Any, ...]) -> AuditEntry:
    return AuditEntry(
        seq=int(row[0]),
        at=parse_ts(row[1]),
        actor=row[2],
        action=row[3],
        device_id=None if row[4] is None else DeviceId(row[4]),
        detail=json.loads(row[5]),
    )


AUDIT_COLUMNS = "seq, at, actor, action, device_id, detail"


def serials_json(serials: list[int]) -> str:
    return json.dumps([serial_hex(s) for s in serials])


def detail_json(detail: dict[str, Any]) -> str:
    # default=str: datetimes, DeviceIds and enums in a detail dict become readable strings.
    return json.dumps(detail, sort_keys=True, default=str)
