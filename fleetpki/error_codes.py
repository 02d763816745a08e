"""The machine-readable error codes the service puts on the wire (header `Fleetpki-Error`).

The agent decides what to do from these (a suspended device waits, a revoked one stops), never
from the one-line reason, which is prose for people and may change. The service maps each
error class to its HTTP status and code in one table (enroll_server/errors.py).
"""

from __future__ import annotations

from enum import StrEnum

# RFC 6648: no "X-" prefix; a name of our own that no other specification uses.
ERROR_HEADER = "Fleetpki-Error"


class ErrorCode(StrEnum):
    """The value of the `Fleetpki-Error` header of an error response (stable; documented)."""

    BAD_REQUEST = "bad-request"
    AUTHENTICATION_FAILED = "authentication-failed"
    FORBIDDEN = "forbidden"
    DEVICE_NOT_ACTIVE = "device-not-active"  # registered, never enrolled or unknown
    DEVICE_SUSPENDED = "device-suspended"  # reversible: `fleetpki device resume`
    DEVICE_REVOKED = "device-revoked"  # final
    NOT_FOUND = "not-found"
    CONFLICT = "conflict"
    UNSUPPORTED_MEDIA_TYPE = "unsupported-media-type"
    TOO_MANY_REQUESTS = "too-many-requests"
    UNAVAILABLE = "unavailable"
