"""Brute-force throttling of token enrollment, per source address and per device id."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from enroll_server.errors import TooManyRequests


@dataclass
class _Window:
    failures: deque[datetime] = field(default_factory=deque)


@dataclass
class Throttle:
    """Counts failed token authentications in a sliding window.

    Only failures count, so a factory line enrolling thousands of devices from one NAT address
    is never slowed; a guesser is stopped after `per_source` (or `per_device`) misses per
    `window`. The 429 is the same for an unknown device and a wrong token.
    """

    per_source: int = 20
    per_device: int = 5
    window: timedelta = timedelta(minutes=1)
    max_keys: int = 100_000
    _by_key: dict[str, _Window] = field(default_factory=dict)

    def _recent(self, key: str, now: datetime) -> deque[datetime] | None:
        win = self._by_key.get(key)
        if win is None:
            return None
        cutoff = now - self.window
        while win.failures and win.failures[0] <= cutoff:
            win.failures.popleft()
        if not win.failures:
            del self._by_key[key]
            return None
        return win.failures

    def check(self, source: str, device: str, now: datetime) -> None:
        if not self._by_key:  # no failure on record: the common case of every enrollment
            return
        for key, limit in ((f"src:{source}", self.per_source), (f"dev:{device}", self.per_device)):
            recent = self._recent(key, now)
            if recent is not None and len(recent) >= limit:
                wait = (recent[0] + self.window - now).total_seconds()
                raise TooManyRequests(
                    "too many failed enrollment attempts; retry later",
                    retry_after=max(1, math.ceil(wait)),
                )

    def failed(self, source: str, device: str, now: datetime) -> None:
        if len(self._by_key) >= self.max_keys:
            # Bound memory under a spray of random ids: forget windows that have lapsed.
            for key in list(self._by_key):
                self._recent(key, now)
        for key in (f"src:{source}", f"dev:{device}"):
            self._by_key.setdefault(key, _Window()).failures.append(now)
