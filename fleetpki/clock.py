"""The one reading of the wall clock: `utc_now()`, a timezone-aware UTC datetime.

Everything else takes the time as a parameter (pure cores; tests pass fixed instants): entry
points call this, and a `clock=` default names it.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)
