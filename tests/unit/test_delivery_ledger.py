"""The soak's delivery ledger (simulators/delivery.py): message by message, either order."""

from __future__ import annotations

from simulators.delivery import EARLY_KEPT_S, DeliveryLedger, message_key


def msg(n: int) -> int:
    return message_key(b'{"ts":"2026-12-05T21:31:%02d.000001Z"}' % n)


def test_message_key_is_stable_across_processes() -> None:
    # BLAKE2b-64 of the bytes, not hash(): the same in a shard process and in the observer's.
    assert message_key(b"telemetry") == 0x0282D20164C97A02
    assert message_key(b"a") != message_key(b"b")


def test_observer_copy_before_the_acknowledgment_is_not_lost() -> None:
    """The case count snapshots got wrong: the observer counted the message, the agent had not
    read its PUBACK yet, then the lifetime began; the device was revoked before sending more."""
    ledger = DeliveryLedger()
    window = ledger.begin()
    ledger.seen("d1", msg(1), t=10.0)  # still in the restart window
    lifetime = ledger.begin()
    ledger.acknowledged("d1", msg(1), t=10.5)  # read in the new lifetime
    ledger.acknowledged("d1", msg(2), t=11.0)
    ledger.seen("d1", msg(2), t=11.1)
    assert ledger.outstanding(lifetime) == 0
    count = ledger.close(lifetime, now=20.0)
    assert (count.acknowledged, count.received, count.lost) == (2, 2, 0)
    assert ledger.close(window, now=20.0).acknowledged == 0


def test_unseen_acknowledged_message_is_lost_with_its_device_and_time() -> None:
    ledger = DeliveryLedger()
    period = ledger.begin()
    for n, device in enumerate(["d1", "d1", "d2"]):
        ledger.acknowledged(device, msg(n), t=float(n))
    ledger.seen("d1", msg(0), t=0.2)
    assert ledger.outstanding(period) == 2
    count = ledger.close(period, now=60.0)
    assert (count.acknowledged, count.received, count.lost) == (3, 1, 2)
    assert count.lost_by_device == {"d1": 1, "d2": 1}
    assert count.lost_acked_at == [1.0, 2.0]
    # Closed means forgotten: a very late copy is not counted anywhere.
    ledger.seen("d2", msg(2), t=61.0)
    assert ledger.close(period, now=61.0).received == 0


def test_each_acknowledgment_counts_in_the_period_it_arrived_in() -> None:
    ledger = DeliveryLedger()
    first = ledger.begin()
    ledger.acknowledged("d1", msg(1), t=1.0)
    second = ledger.begin()
    ledger.acknowledged("d1", msg(2), t=2.0)
    ledger.seen("d1", msg(1), t=2.5)  # the first period's message, seen during the second
    assert (ledger.outstanding(first), ledger.outstanding(second)) == (0, 1)
    assert ledger.close(first, now=3.0).received == 1
    later = ledger.close(second, now=3.0)
    assert (later.acknowledged, later.received, later.lost) == (1, 0, 1)


def test_duplicates_count_once_and_early_copies_expire() -> None:
    ledger = DeliveryLedger()
    period = ledger.begin()
    ledger.acknowledged("d1", msg(1), t=1.0)
    ledger.acknowledged("d1", msg(1), t=1.1)  # a receipt reported twice
    ledger.seen("d1", msg(1), t=1.2)
    ledger.seen("d1", msg(1), t=1.3)  # QoS 1 redelivery: kept as an early copy
    count = ledger.close(period, now=1.0 + EARLY_KEPT_S + 1)  # ... and forgotten here
    assert (count.acknowledged, count.received, count.lost) == (1, 1, 0)
    nxt = ledger.begin()
    ledger.acknowledged("d1", msg(1), t=200.0)  # no stale early copy to match any more
    assert ledger.outstanding(nxt) == 1
