"""Pure timing: renewal schedule, backoff with jitter, clock sanity."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from device_agent.backoff import Backoff
from device_agent.clock import RELEASE_FLOOR, clock_floor, is_sane, parse_http_date
from device_agent.schedule import attempt_timeout, next_renewal, retry_deadline_delay

NB = datetime(2026, 1, 1, tzinfo=UTC)
NA = NB + timedelta(days=30)


def test_renewal_at_two_thirds_plus_bounded_jitter() -> None:
    rng = random.Random(1)
    lifetime = NA - NB
    times = [next_renewal(NB, NA, NB, rng) for _ in range(500)]
    assert min(times) >= NB + lifetime * 2 / 3
    assert max(times) <= NB + lifetime * (2 / 3 + 1 / 12)
    # jitter really spreads: over 500 draws the spread covers most of the window
    assert (max(times) - min(times)) > lifetime / 12 * 0.9


def test_renewal_is_deterministic_for_a_seeded_rng() -> None:
    assert next_renewal(NB, NA, NB, random.Random(7)) == next_renewal(NB, NA, NB, random.Random(7))


def test_renewal_already_due_means_now_and_never_after_expiry() -> None:
    late = NB + timedelta(days=29)
    assert next_renewal(NB, NA, late, random.Random(0)) == late
    assert next_renewal(NB, NA, NB, random.Random(0), fraction=1.0, jitter=0.5) == NA


def test_short_lifetime_scales() -> None:
    nb = NB
    na = nb + timedelta(seconds=6)
    due = next_renewal(nb, na, nb, random.Random(3))
    assert nb + timedelta(seconds=4) <= due <= nb + timedelta(seconds=4.5)


def test_empty_lifetime_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        next_renewal(NA, NB, NB, random.Random(0))


def test_retry_is_clamped_before_expiry() -> None:
    assert retry_deadline_delay(300, NA, NA - timedelta(seconds=100)) == 50
    assert retry_deadline_delay(0.1, NA, NA - timedelta(seconds=100)) == 1.0  # no tight loop
    assert retry_deadline_delay(10, NA, NB) == 10
    # The last seconds: the 1-s floor gives way, so the last attempt is not slept through.
    assert retry_deadline_delay(300, NA, NA - timedelta(seconds=1.5)) == 0.75
    assert retry_deadline_delay(300, NA, NA + timedelta(seconds=5)) == 0.0


def test_attempt_leaves_time_for_another_before_expiry() -> None:
    assert attempt_timeout(30, NA, NB) == 30  # real lifetimes: the HTTP timeout
    assert attempt_timeout(30, NA, NA - timedelta(seconds=20)) == 15  # 5 s kept back
    assert attempt_timeout(30, NA, NA - timedelta(seconds=6)) == 3  # at least half
    assert attempt_timeout(30, NA, NA - timedelta(seconds=1.5)) == 1.0  # the floor...
    assert attempt_timeout(30, NA, NA - timedelta(seconds=0.5)) == 0.5  # ...never past notAfter
    assert attempt_timeout(30, NA, NA + timedelta(seconds=5)) == 0.0
    assert attempt_timeout(0.5, NA, NA - timedelta(seconds=20)) == 0.5


def test_backoff_grows_caps_and_never_hits_zero() -> None:
    policy = Backoff(base=1.0, factor=2.0, cap=60.0)
    rng = random.Random(5)
    assert [policy.ceiling(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.ceiling(10_000) == 60  # no float overflow for a device offline for months
    for attempt in range(12):
        for _ in range(50):
            d = policy.delay(attempt, rng)
            assert policy.ceiling(attempt) / 2 <= d <= policy.ceiling(attempt)
    draws = {round(policy.delay(6, rng), 3) for _ in range(20)}
    assert len(draws) > 10  # jittered, not synchronised


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(base=10, cap=1)
    with pytest.raises(ValueError):
        Backoff().ceiling(-1)


def test_clock_sanity() -> None:
    epoch = datetime(1970, 1, 1, 0, 0, 12, tzinfo=UTC)
    anchor_nb = datetime(2026, 3, 1, tzinfo=UTC)
    floor = clock_floor(anchor_nb)
    assert floor == anchor_nb
    assert clock_floor(None) == RELEASE_FLOOR
    assert clock_floor(datetime(2000, 1, 1, tzinfo=UTC)) == RELEASE_FLOOR
    assert not is_sane(epoch, floor)
    assert is_sane(anchor_nb + timedelta(seconds=1), floor)


def test_http_date() -> None:
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == datetime(
        1994, 11, 6, 8, 49, 37, tzinfo=UTC
    )
    assert parse_http_date("yesterday") is None
    assert parse_http_date(None) is None
