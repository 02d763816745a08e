"""Certificate serial numbers: positive, unpredictable, at most 20 octets (RFC 5280 4.1.2.2)."""

from __future__ import annotations

import secrets
import time

RANDOM_BITS = 128
_CLOCK_BITS = 30  # milliseconds, wrapping every ~12.4 days
_CLOCK_MASK = (1 << _CLOCK_BITS) - 1
_TOP = 1 << (RANDOM_BITS + _CLOCK_BITS)  # bit 158: every serial is exactly 159 bits long


def new_serial() -> int:
    """159 bits: a fixed top bit, 30 bits of the millisecond clock, 128 random bits.

    The 128 bits from the CSPRNG are what makes a serial unpredictable (CA/B Forum BR 7.1
    asks for 64); the registry's serial PRIMARY KEY keeps it unique. The clock in the high
    bits makes serials issued close together sort together: the registry's serial index
    takes each group commit's certificates on one or two B-tree pages at its right edge,
    where 128 random high bits scattered them over a dozen pages, each a 4 KB frame to
    append to the WAL and later checkpoint (BENCHMARKS.md, "Enrollment": 30 -> 18 frames
    per transaction). The clock wraps every ~12.4 days, which only moves where new serials
    cluster. The fixed top bit keeps every serial 159 bits long: positive, 20 DER octets with
    no leading zero octet (RFC 5280 4.1.2.2), and its hex in the registry (fixed width)
    sorts like the number.
    """
    clock = (time.time_ns() // 1_000_000) & _CLOCK_MASK
    return _TOP | (clock << RANDOM_BITS) | secrets.randbits(RANDOM_BITS)
