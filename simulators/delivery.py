"""The delivery ledger: which QoS 1 messages the broker acknowledged and the observer saw.

Messages are matched one by one, by a digest of their bytes (`message_key`; every telemetry
message carries its own timestamp, so no two of a device's messages are equal), not by counts.
The PUBACK of a message and the observer's copy of it reach the simulator in either order; a
pair of count snapshots taken between the two calls an in-flight message lost. That
is what the soak of 2026-12-05 21:25 reported as 179 lost messages: the snapshot opening one
broker lifetime was taken while the loop ran 6.7 s late, after the observer had counted
messages whose acknowledgments the agents had not read yet. Devices still publishing made up
for it by the end of the lifetime; the 97 revoked within it could not.

Pure: time is passed in. Memory stays flat: a message is forgotten once matched, and what is
left of a period is forgotten when the period is closed.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

EARLY_KEPT_S = 120.0  # an observer copy with no acknowledgment after this is a duplicate


def message_key(payload: bytes) -> int:
    """A message's identity: 64 bits of BLAKE2b, the same in every process (the agents may
    run in other processes than the observer; Python's hash() of bytes differs between
    processes)."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big")


@dataclass
class PeriodCount:
    """One accounting period's messages (a broker lifetime, or the restart window after it)."""

    acknowledged: int = 0
    received: int = 0  # of those acknowledged, the ones the observer saw
    # device -> acknowledged but never seen; and when (the caller's seconds) they were acked
    lost_by_device: dict[str, int] = field(default_factory=dict)
    lost_acked_at: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return sum(self.lost_by_device.values())


class DeliveryLedger:
    """Acknowledgments (the agents' delivery receipts) matched against the observer's copies.

    Every acknowledgment is counted in the period open when it arrives (`begin`); the
    observer's copy may come before or after it.
    """

    def __init__(self) -> None:
        self.period = 0
        self._counts: dict[int, PeriodCount] = defaultdict(PeriodCount)
        # device -> digest -> (period, t): acknowledged, not seen yet
        self._pending: dict[str, dict[int, tuple[int, float]]] = defaultdict(dict)
        # device -> digest -> t: seen before its acknowledgment was read (or a duplicate)
        self._early: dict[str, dict[int, float]] = defaultdict(dict)

    def begin(self) -> int:
        """Open the next period; acknowledgments from now on count in it."""
        self.period += 1
        return self.period

    def acknowledged(self, device_id: str, key: int, t: float) -> None:
        """A delivery receipt: the broker acknowledged the message `key` (message_key)."""
        count = self._counts[self.period]
        early = self._early.get(device_id)
        if early is not None and early.pop(key, None) is not None:
            count.acknowledged += 1
            count.received += 1
            return
        pending = self._pending[device_id]
        if key not in pending:  # a receipt reported twice is one message
            pending[key] = (self.period, t)
            count.acknowledged += 1

    def seen(self, device_id: str, key: int, t: float) -> None:
        """The observer's copy of the message `key`."""
        pending = self._pending.get(device_id)
        hit = pending.pop(key, None) if pending is not None else None
        if hit is not None:
            self._counts[hit[0]].received += 1
        else:
            self._early[device_id][key] = t

    def outstanding(self, period: int) -> int:
        """Messages of `period` acknowledged and not seen yet."""
        return sum(
            1 for pending in self._pending.values() for p, _ in pending.values() if p == period
        )

    def close(self, period: int, now: float) -> PeriodCount:
        """The period's final count: what is still unseen is lost (and forgotten). Observer
        copies older than EARLY_KEPT_S without an acknowledgment are forgotten too."""
        count = self._counts.pop(period, PeriodCount())
        for device_id, pending in self._pending.items():
            lost = [(key, t) for key, (p, t) in pending.items() if p == period]
            for key, t in lost:
                del pending[key]
                count.lost_acked_at.append(t)
            if lost:
                count.lost_by_device[device_id] = len(lost)
        count.lost_acked_at.sort()
        for early in self._early.values():
            for key in [k for k, t in early.items() if now - t > EARLY_KEPT_S]:
                del early[key]
        return count
