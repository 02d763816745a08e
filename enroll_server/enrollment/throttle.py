"""Failed token enrollments, counted per source network and per device id (bounded memory)."""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from enroll_server.errors import TooManyRequests
from fleetpki.identity import is_valid_id

# IPv6 hosts get a /64 each (RFC 4291 2.5.4, RFC 7421): one guesser holds 2^64 addresses, so
# counting per address would count nothing. IPv4 counts per address.
IPV6_SOURCE_PREFIX = 64
MAX_KEYS = 100_000


def source_key(address: str) -> str:
    """What failures from `address` are counted under: the IPv4 address, the IPv6 /64 (an
    IPv4-mapped IPv6 address counts as its IPv4 address), or the text itself if it is no IP
    address (a Unix socket, "?"), cut to 64 characters."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "src:" + address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"src:{ip.ipv4_mapped}"
        net = ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False)
        return f"src:{net}"
    return f"src:{ip}"


@dataclass
class Throttle:
    """Failed token authentications in a sliding window; it throttles guessers, never a
    correct token.

    The token is checked first, always: a correct token enrolls however many failures its
    device id or its source has on record, so neither wrong guesses against a device id
    (ids are sequential, easy to name) nor a guesser behind the same NAT address can lock an
    honest device out. A failure is answered 429 with Retry-After, instead of 401, once its
    source (`per_source`) or its device id (`per_device`) has that many failures in `window`.
    Tokens carry 256 random bits, so guessing is hopeless at any rate; the throttle tells a
    misbehaving client to back off.

    Memory is bounded: a device key only for a well-formed id (a malformed login counts for
    its source alone and is never stored), at most `per_*` timestamps per key, and at most
    `max_keys` keys, the least recently failed dropped first.
    """

    per_source: int = 20
    per_device: int = 5
    window: timedelta = timedelta(minutes=1)
    max_keys: int = MAX_KEYS
    _by_key: OrderedDict[str, deque[datetime]] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        """How many sources and device ids have failures on record (at most max_keys)."""
        return len(self._by_key)

    def _keys(self, source: str, device: str) -> list[tuple[str, int]]:
        keys = [(source_key(source), self.per_source)]
        if is_valid_id(device):
            keys.append(("dev:" + device, self.per_device))
        return keys

    def _recent(self, key: str, now: datetime) -> deque[datetime] | None:
        failures = self._by_key.get(key)
        if failures is None:
            return None
        cutoff = now - self.window
        while failures and failures[0] <= cutoff:
            failures.popleft()
        if not failures:
            del self._by_key[key]
            return None
        return failures

    def failed(self, source: str, device: str, now: datetime) -> TooManyRequests | None:
        """Record a failed authentication; the 429 to answer instead of the 401 if its source
        or device id is over its limit (None: answer the failure itself)."""
        over: TooManyRequests | None = None
        for key, limit in self._keys(source, device):
            failures = self._recent(key, now)
            if failures is None:
                failures = self._by_key[key] = deque(maxlen=limit)
            else:
                self._by_key.move_to_end(key)
            if len(failures) >= limit and over is None:
                wait = (failures[0] + self.window - now).total_seconds()
                over = TooManyRequests(
                    "too many failed enrollment attempts; retry later",
                    retry_after=max(1, math.ceil(wait)),
                )
            failures.append(now)
        while len(self._by_key) > self.max_keys:
            self._by_key.popitem(last=False)
        return over
