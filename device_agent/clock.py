"""Clock sanity: is the system time plausible enough to judge certificate validity? (pure)"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# A Pi without a real-time clock boots in 1970 (or at its last fake-hwclock save) until NTP
# syncs. No real clock can be earlier than this agent's release, nor than the creation of the
# trust anchor the factory put on the device.
RELEASE_FLOOR = datetime(2025, 1, 1, tzinfo=UTC)


def clock_floor(known_past: datetime | None) -> datetime:
    """The earliest plausible 'now': the release date, or a moment known to have passed (the
    notBefore of our certificate or of the trust anchor), whichever is later."""
    if known_past is None:
        return RELEASE_FLOOR
    return max(RELEASE_FLOOR, known_past)


def is_sane(now: datetime, floor: datetime) -> bool:
    return now >= floor


def parse_http_date(value: str | None) -> datetime | None:
    """An HTTP Date header (RFC 9110 5.6.7) as an aware UTC datetime, or None if unparseable."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        # OverflowError: a field too large for datetime ('12:0555...:00'), or a date at the
        # edge of its range that a zone offset moves past year 1 or 9999.
        return None
