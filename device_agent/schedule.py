"""The renewal schedule: when to renew a certificate (pure; time and randomness passed in)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

# Renew at 2/3 of the lifetime: a third of it remains to ride out a server outage. The jitter
# (up to 1/12 of the lifetime) spreads a factory batch enrolled in the same minute so that
# thousands of devices do not all renew in the same second.
RENEW_FRACTION = 2 / 3
JITTER_FRACTION = 1 / 12


def next_renewal(
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    rng: random.Random,
    *,
    fraction: float = RENEW_FRACTION,
    jitter: float = JITTER_FRACTION,
) -> datetime:
    """The moment to start renewing: `fraction` of the lifetime plus up to `jitter` of it.

    Never later than the end of the lifetime, and never in the past (a certificate found
    already due is renewed now).
    """
    if not_after <= not_before:
        raise ValueError(f"certificate lifetime is empty: {not_before} .. {not_after}")
    lifetime = not_after - not_before
    due = not_before + lifetime * fraction + lifetime * (jitter * rng.random())
    due = min(due, not_after)
    return max(due, now)


def renewal_after_issue(
    not_before: datetime, not_after: datetime, now: datetime, rng: random.Random
) -> datetime:
    """The renewal time of a certificate just received: next_renewal(), but never sooner than
    a third of the remaining validity from now.

    The floor matters only when the backdated notBefore dwarfs a short validity (a test CA
    issuing 10-second certificates backdated by minutes): without it the 2/3 point would lie
    in the past and every fresh certificate would be renewed at once, in a tight loop.
    """
    due = next_renewal(not_before, not_after, now, rng)
    return max(due, now + (not_after - now) / 3)


# A renewal attempt or the pause before the next one may shrink to this before the last
# seconds of a certificate's life; below it, to what is left (one more attempt still fits).
MIN_RETRY_S = 1.0


def retry_deadline_delay(delay: float, not_after: datetime, now: datetime) -> float:
    """Clamp a retry delay so that a renewal retry still happens before the certificate
    expires: at most half of the remaining validity, and at least MIN_RETRY_S unless less than
    twice that remains (then half of what remains, so the last attempt is not slept through).

    `now` must be read after the failed attempt: an attempt can take most of what remained.
    """
    half = (not_after - now).total_seconds() / 2
    return max(0.0, min(MIN_RETRY_S, half), min(delay, half))


# What a renewal attempt leaves of the validity for one more attempt if it stalls: a TLS
# handshake and an issuance take a second or two even on a slow link.
RETRY_RESERVE_S = 5.0


def attempt_timeout(timeout: float, not_after: datetime, now: datetime) -> float:
    """How long one renewal attempt may take: the HTTP `timeout`, but no longer than the
    remaining validity less RETRY_RESERVE_S (at least half of it, at least MIN_RETRY_S), so
    that a stalled attempt leaves time for another, and never past notAfter: the server
    refuses an expired certificate (RFC 5280 6.1.3 (a)(2)), so time spent after it is lost."""
    remaining = (not_after - now).total_seconds()
    bound = max(MIN_RETRY_S, remaining / 2, remaining - RETRY_RESERVE_S)
    return max(0.0, min(timeout, bound, remaining))


def is_expired(not_after: datetime, now: datetime) -> bool:
    return now >= not_after


def remaining(not_after: datetime, now: datetime) -> timedelta:
    return not_after - now
