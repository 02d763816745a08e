"""Device and service identifiers: the one place that says what a valid id is."""

from __future__ import annotations

import re
from dataclasses import dataclass

# An id is a certificate CN, an MQTT client id, a topic level, a folder name and an HTTP Basic
# user name at once, so it must be safe in all five: no '/', '+', '#', ':', spaces, dots at the
# start (no '.' or '..' folders), control characters or non-ASCII. 64 is the RFC 5280 upper
# bound for a CN (ub-common-name) and well inside MQTT 3.1.1's client-id allowance.
# fullmatch, never match with '^...$': '$' also matches before a trailing newline, and
# "dev-1\n" would pass as an id (a CN, a folder and a topic level with a newline in it).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
URN_PREFIX = "urn:fleetpki:device:"
SERVICE_URN_PREFIX = "urn:fleetpki:service:"


class InvalidIdentifier(ValueError):
    """A device or service id that does not fit the id grammar."""

    def __init__(self, value: str, why: str) -> None:
        super().__init__(f"invalid device id {value!r}: {why}")
        self.value = value
        self.why = why


def _check(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidIdentifier(repr(value), "not a string")
    if not value:
        raise InvalidIdentifier(value, "empty")
    if len(value) > 64:
        raise InvalidIdentifier(value, f"{len(value)} characters, at most 64 allowed")
    if not _ID_RE.fullmatch(value):
        bad = next((c for c in value if not (c.isascii() and (c.isalnum() or c in "_-"))), value[0])
        raise InvalidIdentifier(
            value,
            f"character {bad!r} not allowed (letters, digits, '-' and '_' only; "
            "must start with a letter or digit)",
        )
    return value


@dataclass(frozen=True, slots=True, order=True)
class DeviceId:
    """A validated device id: CN, MQTT client id and topic level of one device."""

    value: str

    def __post_init__(self) -> None:
        _check(self.value)

    def __str__(self) -> str:
        return self.value

    @property
    def urn(self) -> str:
        """The SAN URI carried by the device certificate."""
        return URN_PREFIX + self.value

    @classmethod
    def parse(cls, value: object) -> DeviceId:
        return cls(_check(value))


def is_valid_id(value: str) -> bool:
    try:
        _check(value)
    except InvalidIdentifier:
        return False
    return True
