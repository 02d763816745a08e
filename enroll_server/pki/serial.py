"""Certificate serial numbers: positive, unpredictable, at most 20 octets (RFC 5280 4.1.2.2)."""

from __future__ import annotations

import secrets


def new_serial() -> int:
    """159 random bits: >= 128 bits of entropy (CA/B BR 7.1), positive, and <= 20 DER octets.

    The top bit of 160 stays clear so the DER INTEGER never needs a 21st leading zero octet;
    a zero result (probability 2**-159) is replaced because serials must be positive.
    """
    while True:
        serial = secrets.randbits(159)
        if serial >= 1 << 128:  # keep at least 129 significant bits: never a short serial
            return serial
