"""Retry delays: exponential backoff with jitter (pure; the random source is passed in)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """base * factor**attempt, capped, then "equal jitter": half fixed, half random.

    The fixed half guarantees a minimum pause (no tight loop even at attempt 0); the random
    half de-synchronises a fleet that lost its server at the same moment.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.factor >= 1 and self.cap >= self.base):
            raise ValueError(f"bad backoff parameters: {self}")

    def ceiling(self, attempt: int) -> float:
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        # Compare exponents rather than computing factor**attempt, which overflows floats.
        exp = self.base
        for _ in range(attempt):
            exp *= self.factor
            if exp >= self.cap:
                return self.cap
        return min(exp, self.cap)

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)
