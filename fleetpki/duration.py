"""Human durations for the CLI and config files: '30s', '15m', '12h', '7d', '2w'."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")


class InvalidDuration(ValueError):
    def __init__(self, value: str) -> None:
        super().__init__(
            f"invalid duration {value!r}: use a number and a unit s, m, h, d or w (e.g. 7d, 30s)"
        )
        self.value = value


def parse_duration(value: str) -> timedelta:
    m = _RE.fullmatch(value)
    if not m:
        raise InvalidDuration(value)
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise InvalidDuration(value)
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
