"""record_issuances: several issuances in one transaction (group commit), one outcome each.

Against a real registry file. The fast path (executemany) and the slow path (one SAVEPOINT per
item) must write exactly what one record_issuance per item writes, refuse exactly the items a
single call would refuse, and leave no trace of a refused item.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from enroll_server.registry import (
    CertStatus,
    DeviceNotActive,
    DeviceState,
    DuplicateSerial,
    InvalidValue,
    Issuance,
    IssuedCertificate,
    Registry,
    TokenRejected,
    UnknownCertificate,
    UnknownDevice,
)
from enroll_server.registry import issuance as issuance_mod
from enroll_server.registry.issuance import IssuanceStore, _batchable
from enroll_server.registry.location import PostgresLocation
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa
from tests.unit.test_registry import NOW, TTL, issued, new_devices, token_hash

TABLES = ("batches", "devices", "tokens", "certificates", "audit", "events")


# ---------------------------------------------------------------- helpers


@pytest.fixture
def reg(registry_location: Path | str) -> Iterator[Registry]:
    """The registry on each backend in turn (conftest.registry_location)."""
    registry = Registry.open(registry_location)
    yield registry
    registry.close()


def provision(reg: Registry, count: int, prefix: str = "b") -> list[DeviceId]:
    """A token batch of `count` devices named prefix-000000...; token of X is 'token-X'."""
    reg.create_batch(
        prefix, new_devices(prefix, count), kind="token", token_ttl=TTL, now=NOW, actor="op"
    )
    return [DeviceId(f"{prefix}-{i:06d}") for i in range(count)]


def own_token(device: DeviceId) -> str:
    return token_hash(f"token-{device.value}")


def token_item(
    ca: MemoryCa,
    device: DeviceId,
    *,
    token: str | None = None,
    now: datetime = NOW,
    actor: str = "est",
) -> Issuance:
    """A first enrollment of `device` with a real certificate, spending its own token."""
    return Issuance(issued(ca, device.value), token or own_token(device), None, now, actor)


def dump(reg: Registry) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the data tables, as committed (read through a second connection)."""
    if isinstance(reg.location, PostgresLocation):
        with psycopg.connect(reg.location.url) as pg:
            return {
                t: sorted(pg.execute(f"SELECT * FROM {t}").fetchall(), key=repr)  # type: ignore[arg-type]
                for t in TABLES
            }
    with closing(sqlite3.connect(reg.path)) as raw:
        return {t: raw.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in TABLES}


@contextmanager
def traced(reg: Registry) -> Iterator[list[str]]:
    """The SQL statements the registry's connection runs meanwhile."""
    seen: list[str] = []
    reg._conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        reg._conn.set_trace_callback(None)


def tx_counts(seen: list[str]) -> dict[str, int]:
    return {
        "begin": sum(s.startswith("BEGIN") for s in seen),
        "commit": sum(s == "COMMIT" for s in seen),
        "rollback": sum(s == "ROLLBACK" for s in seen),
        "savepoint": sum(s.startswith("SAVEPOINT") for s in seen),
    }


@pytest.fixture
def one_by_one(monkeypatch: pytest.MonkeyPatch) -> list[Issuance]:
    """The items the slow path (_issue_one) handled, in order."""
    handled: list[Issuance] = []
    real = IssuanceStore._issue_one

    def spy(self: IssuanceStore, conn: sqlite3.Connection, item: Issuance) -> None:
        handled.append(item)
        real(self, conn, item)

    monkeypatch.setattr(IssuanceStore, "_issue_one", spy)
    return handled


def issue_audits(reg: Registry, device: DeviceId) -> list[dict[str, object]]:
    return [
        e.detail
        for e in reg.audit_log(device_id=device, limit=100)
        if e.action == "certificate.issue"
    ]


def issued_events(reg: Registry) -> list[tuple[DeviceId | None, tuple[int, ...]]]:
    """(device, (serial,)) of every recorded issuance, oldest first: the audit log's
    certificate.issue entries (issuances are not journaled as events)."""
    entries = sorted(reg.audit_log(limit=1_000_000), key=lambda e: e.seq)
    return [
        (e.device_id, (int(e.detail["serial"], 16),))
        for e in entries
        if e.action == "certificate.issue"
    ]


def token_state(reg: Registry, device: DeviceId, token: str) -> str:
    """'ok' if the token would still enroll the device at NOW, else the rejection reason."""
    try:
        reg.check_token(device, token, NOW)
    except TokenRejected as exc:
        return exc.reason
    return "ok"


def assert_recorded(reg: Registry, item: Issuance) -> None:
    """The issuance is in the registry exactly as a single record_issuance writes it."""
    device = item.cert.device_id
    record = reg.get_certificate(item.cert.serial)
    assert record is not None, f"{device} not recorded"
    assert (record.device_id, record.status) == (device, CertStatus.ACTIVE)
    assert record.fingerprint_sha256 == item.cert.fingerprint_sha256
    assert (record.not_before, record.not_after) == (item.cert.not_before, item.cert.not_after)
    assert (record.issued_at, record.pem) == (item.now, item.cert.pem)
    state = reg.get_device(device)
    assert state is not None and state.state is DeviceState.ACTIVE
    if item.consume_token_hash is not None:
        assert token_state(reg, device, item.consume_token_hash) == "used"
    assert (device, (item.cert.serial,)) in issued_events(reg)
    assert {
        "serial": format(item.cert.serial, "x"),
        "not_after": item.cert.not_after.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "supersedes": None
        if item.supersedes_serial is None
        else format(item.supersedes_serial, "x"),
        "with_token": item.consume_token_hash is not None,
    } in issue_audits(reg, device)


def assert_no_trace(reg: Registry, device: DeviceId, token: str | None = None) -> None:
    """A refused first enrollment: no certificate, audit or event; still provisioned."""
    assert reg.certificates_of(device) == []
    state = reg.get_device(device)
    assert state is not None
    assert (state.state, state.enrolled_at) == (DeviceState.PROVISIONED, None)
    assert issue_audits(reg, device) == []
    assert all(d != device for d, _ in issued_events(reg))
    if token is not None:
        assert token_state(reg, device, token) == "ok"


# ---------------------------------------------------------------- the common case


def test_batch_of_token_issuances_is_one_executemany_transaction(
    reg: Registry, ca: MemoryCa, one_by_one: list[Issuance]
) -> None:
    devices = provision(reg, 6)
    items = [token_item(ca, d) for d in devices]
    with traced(reg) as seen:
        outcomes = reg.record_issuances(items)
    assert outcomes == [None] * 6
    # One transaction, committed once, without any item redone on its own.
    assert tx_counts(seen) == {"begin": 1, "commit": 1, "rollback": 0, "savepoint": 0}
    assert one_by_one == []
    for item in items:
        assert_recorded(reg, item)
    assert issued_events(reg) == [(i.cert.device_id, (i.cert.serial,)) for i in items]
    audits = [e for e in reg.audit_log(limit=100) if e.action == "certificate.issue"]
    assert len(audits) == 6
    assert {e.actor for e in audits} == {"est"}
    # Issuances are in the audit log only: the events journal is for revocation pollers.
    assert dump(reg)["events"] == []


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_batch_writes_exactly_what_single_calls_write(
    tmp_path: Path,
    ca: MemoryCa,
    one_by_one: list[Issuance],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """Every row of every table, byte for byte, recorded one by one vs. in one batch."""
    single = Registry.open(tmp_path / "single.db")
    batched = Registry.open(tmp_path / "batched.db")
    try:
        devices = provision(single, 5)
        assert provision(batched, 5) == devices
        # Each item its own time and actor, and one without a token (IDevID-style), so that
        # a value taken from the wrong item or the wrong column would show.
        items = [
            token_item(ca, d, now=NOW + timedelta(seconds=i), actor=f"est-{i}")
            for i, d in enumerate(devices[:4])
        ]
        items.append(Issuance(issued(ca, devices[4].value), None, None, NOW, "idevid"))
        for item in items:
            single.record_issuance(
                item.cert,
                consume_token_hash=item.consume_token_hash,
                supersedes_serial=item.supersedes_serial,
                now=item.now,
                actor=item.actor,
            )
        one_by_one.clear()
        if path == "slow":
            monkeypatch.setattr(issuance_mod, "_batchable", lambda batch: False)
        assert batched.record_issuances(items) == [None] * 5
        assert one_by_one == (items if path == "slow" else [])
        expected = dump(single)
        assert len(expected["certificates"]) == 5 and len(expected["audit"]) >= 5
        assert dump(batched) == expected
    finally:
        single.close()
        batched.close()


def test_empty_batch_writes_nothing(reg: Registry, ca: MemoryCa) -> None:
    provision(reg, 2)
    before = dump(reg)
    with traced(reg) as seen:
        assert reg.record_issuances([]) == []
    assert tx_counts(seen)["begin"] == 0
    assert dump(reg) == before


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ([("t1", None), ("t2", None)], True),
        ([(None, None), (None, None), ("t1", None)], True),  # no token twice is not a clash
        ([("t1", None), ("t1", None)], False),
        ([("t1", None), (None, 7)], False),
        ([], True),
    ],
)
def test_batchable(batch: list[tuple[str | None, int | None]], expected: bool) -> None:
    cert = IssuedCertificate(1, DeviceId("x"), "0" * 64, NOW, NOW + TTL, "PEM")
    items = [Issuance(cert, token, old, NOW, "est") for token, old in batch]
    assert _batchable(items) is expected


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("reason", ["unknown", "used", "expired", "wrong-device"])
def test_refused_token_in_the_middle_leaves_the_others_recorded(
    reg: Registry, ca: MemoryCa, one_by_one: list[Issuance], reason: str
) -> None:
    devices = provision(reg, 6)  # the last one only lends its token (wrong-device)
    victim = devices[2]
    items = [token_item(ca, d) for d in devices[:5]]
    still_valid = own_token(victim)
    if reason == "unknown":
        items[2] = token_item(ca, victim, token=token_hash("no such token"))
    elif reason == "used":
        # A reissued token kills the earlier one: the earlier one now counts as used.
        still_valid = token_hash("fresh")
        reg.add_token(victim, still_valid, NOW + TTL, NOW)
    elif reason == "expired":
        items[2] = token_item(ca, victim, now=NOW + TTL)  # expires_at is NOW + TTL exactly
    else:
        items[2] = token_item(ca, victim, token=own_token(devices[5]))
    with traced(reg) as seen:
        outcomes = reg.record_issuances(items)
    refused = outcomes[2]
    assert isinstance(refused, TokenRejected)
    assert (refused.reason, refused.device_id) == (reason, victim)
    assert outcomes[:2] + outcomes[3:] == [None] * 4
    # The executemany attempt was rolled back and every item redone on its own, committed once.
    assert tx_counts(seen) == {"begin": 2, "commit": 1, "rollback": 1, "savepoint": 5}
    assert one_by_one == items
    for item in items[:2] + items[3:]:
        assert_recorded(reg, item)
    assert_no_trace(reg, victim, still_valid)
    assert reg.get_certificate(items[2].cert.serial) is None
    assert token_state(reg, devices[5], own_token(devices[5])) == "ok"
    assert len(issued_events(reg)) == 4


@pytest.mark.parametrize("state", ["suspended", "revoked"])
def test_device_no_longer_active_is_refused_alone(reg: Registry, ca: MemoryCa, state: str) -> None:
    devices = provision(reg, 4)
    victim = devices[1]
    if state == "suspended":
        reg.suspend_device(victim, now=NOW, actor="op")
    else:
        reg.revoke_device(victim, reason="keyCompromise", now=NOW, actor="op")
    items = [token_item(ca, d) for d in devices]
    outcomes = reg.record_issuances(items)
    refused = outcomes[1]
    assert isinstance(refused, DeviceNotActive)
    assert (refused.device_id, refused.state) == (victim, state)
    assert [outcomes[0], *outcomes[2:]] == [None] * 3
    for item in [items[0], *items[2:]]:
        assert_recorded(reg, item)
    # Refused without a trace: the token is not spent, the state is what it was.
    assert reg.certificates_of(victim) == []
    device = reg.get_device(victim)
    assert device is not None and device.state.value == state
    assert token_state(reg, victim, own_token(victim)) == "ok"
    assert issue_audits(reg, victim) == []


def test_unknown_device_is_refused_alone(reg: Registry, ca: MemoryCa) -> None:
    devices = provision(reg, 2)
    ghost = DeviceId("ghost")
    items = [
        token_item(ca, devices[0]),
        Issuance(issued(ca, ghost.value), None, None, NOW, "idevid"),
        token_item(ca, devices[1]),
    ]
    outcomes = reg.record_issuances(items)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], UnknownDevice) and outcomes[1].device_id == ghost
    assert reg.get_certificate(items[1].cert.serial) is None
    assert len(issued_events(reg)) == 2


def test_same_token_twice_in_one_batch_is_spent_once(
    reg: Registry, ca: MemoryCa, one_by_one: list[Issuance]
) -> None:
    devices = provision(reg, 3)
    twin = devices[1]
    items = [
        token_item(ca, devices[0]),
        token_item(ca, twin),
        token_item(ca, twin),  # a retry racing the first: another key, the same token
        token_item(ca, devices[2]),
    ]
    with traced(reg) as seen:
        outcomes = reg.record_issuances(items)
    assert outcomes[:2] == [None, None] and outcomes[3] is None
    loser = outcomes[2]
    assert isinstance(loser, TokenRejected)
    assert (loser.reason, loser.device_id) == ("used", twin)
    # Not batchable: straight to one by one, one transaction.
    assert tx_counts(seen)["begin"] == 1 and one_by_one == items
    assert [c.serial for c in reg.certificates_of(twin)] == [items[1].cert.serial]
    assert len(issue_audits(reg, twin)) == 1
    assert [s for d, s in issued_events(reg) if d == twin] == [(items[1].cert.serial,)]


def test_token_of_a_refused_item_is_left_for_a_later_item(reg: Registry, ca: MemoryCa) -> None:
    """ROLLBACK TO the item's savepoint gives its token back within the same transaction."""
    (device,) = provision(reg, 1)
    clash_with = issued(ca, device.value)
    reg.record_issuance(
        clash_with, consume_token_hash=None, supersedes_serial=None, now=NOW, actor="idevid"
    )
    clashing = IssuedCertificate(
        clash_with.serial, device, token_hash("another der"), NOW, NOW + TTL, "PEM"
    )
    items = [
        Issuance(clashing, own_token(device), None, NOW, "est"),
        token_item(ca, device),
    ]
    outcomes = reg.record_issuances(items)
    assert isinstance(outcomes[0], DuplicateSerial) and outcomes[0].serial == clash_with.serial
    assert outcomes[1] is None
    assert_recorded(reg, items[1])
    record = reg.get_certificate(clash_with.serial)
    assert record is not None and record.fingerprint_sha256 == clash_with.fingerprint_sha256


def test_duplicate_within_the_batch_records_the_first(
    reg: Registry, ca: MemoryCa, one_by_one: list[Issuance]
) -> None:
    devices = provision(reg, 3)
    first = token_item(ca, devices[0])
    cert = issued(ca, devices[1].value)
    cert = replace(cert, serial=first.cert.serial)
    items = [
        first,
        Issuance(cert, own_token(devices[1]), None, NOW, "est"),
        token_item(ca, devices[2]),
    ]
    with traced(reg) as seen:
        outcomes = reg.record_issuances(items)
    assert outcomes[0] is None and outcomes[2] is None
    refused = outcomes[1]
    assert isinstance(refused, DuplicateSerial) and refused.serial == first.cert.serial
    # The IntegrityError of the executemany INSERT sent the batch down the slow path.
    assert tx_counts(seen)["rollback"] == 1 and one_by_one == items
    assert_recorded(reg, first)
    assert_recorded(reg, items[2])
    assert_no_trace(reg, devices[1], own_token(devices[1]))


# ---------------------------------------------------------------- renewals


def test_renewal_mixed_with_first_enrollments(
    reg: Registry, ca: MemoryCa, one_by_one: list[Issuance]
) -> None:
    devices = provision(reg, 3)
    renewing = devices[0]
    old = token_item(ca, renewing)
    reg.record_issuances([old])
    later = NOW + timedelta(days=20)
    renewal = Issuance(issued(ca, renewing.value, now=later), None, old.cert.serial, later, "re")
    items = [token_item(ca, devices[1]), renewal, token_item(ca, devices[2])]
    one_by_one.clear()
    with traced(reg) as seen:
        assert reg.record_issuances(items) == [None, None, None]
    assert tx_counts(seen) == {"begin": 1, "commit": 1, "rollback": 0, "savepoint": 3}
    assert one_by_one == items
    statuses = {c.serial: c.status for c in reg.certificates_of(renewing)}
    assert statuses == {
        old.cert.serial: CertStatus.SUPERSEDED,
        renewal.cert.serial: CertStatus.ACTIVE,
    }
    device = reg.get_device(renewing)
    assert device is not None and device.enrolled_at == NOW  # the first enrollment is kept
    for item in items:
        assert_recorded(reg, item)


def test_renewal_of_an_unknown_certificate_is_refused_alone(reg: Registry, ca: MemoryCa) -> None:
    devices = provision(reg, 2)
    old = token_item(ca, devices[0])
    reg.record_issuances([old])
    bogus = Issuance(issued(ca, devices[0].value), None, 12345, NOW, "re")
    items = [bogus, token_item(ca, devices[1])]
    outcomes = reg.record_issuances(items)
    assert isinstance(outcomes[0], UnknownCertificate)
    assert (outcomes[0].serial, outcomes[0].device_id) == (12345, devices[0])
    assert outcomes[1] is None
    # The new certificate was inserted before the check, and went with the refusal.
    assert reg.get_certificate(bogus.cert.serial) is None
    only = reg.get_certificate(old.cert.serial)
    assert only is not None and only.status is CertStatus.ACTIVE
    assert_recorded(reg, items[1])


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_unexpected_database_error_records_nothing(
    reg: Registry, ca: MemoryCa, one_by_one: list[Issuance], path: str
) -> None:
    """A real SQLite error on the last item undoes the items already written before it."""
    devices = provision(reg, 4)
    doomed = devices[3].value
    failing = [True]
    error: type[Exception] = sqlite3.OperationalError
    if isinstance(reg.location, PostgresLocation):
        error = psycopg.errors.RaiseException
        with psycopg.connect(reg.location.url, autocommit=True) as pg:
            pg.execute(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.device_id = '{doomed}' THEN RAISE EXCEPTION 'disk on fire'; END IF; "
                "RETURN NEW; END $$"
            )
            pg.execute(
                "CREATE TRIGGER boom_on_audit AFTER INSERT ON audit "
                "FOR EACH ROW EXECUTE FUNCTION boom()"
            )
    else:

        def boom(device: str) -> int:
            if failing[0] and device == doomed:
                raise RuntimeError("disk on fire")
            return 0

        reg._conn.create_function("boom", 1, boom)  # type: ignore[attr-defined]
        reg._conn.execute(
            "CREATE TRIGGER boom_on_audit AFTER INSERT ON audit "
            "BEGIN SELECT boom(NEW.device_id); END"
        )
    items = [token_item(ca, d) for d in devices]
    if path == "slow":  # a refusal first, so the error strikes while redoing one by one
        items[1] = token_item(ca, devices[1], token=token_hash("wrong"))
    before = dump(reg)
    with traced(reg) as seen, pytest.raises(error):
        reg.record_issuances(items)
    assert tx_counts(seen)["commit"] == 0
    assert one_by_one == ([] if path == "fast" else items)  # items 0..2 were written, then undone
    assert not reg._conn.in_transaction  # type: ignore[attr-defined]
    assert dump(reg) == before
    for d in devices:
        assert_no_trace(reg, d, own_token(d))
    # The registry is still usable: the same batch goes through once the fault is gone.
    failing[0] = False
    if isinstance(reg.location, PostgresLocation):
        with psycopg.connect(reg.location.url, autocommit=True) as pg:
            pg.execute("DROP TRIGGER boom_on_audit ON audit")
    outcomes = reg.record_issuances(items)
    assert outcomes[0] is None and outcomes[2:] == [None, None]
    assert len(reg.certificates_of(devices[3])) == 1


@pytest.mark.parametrize(
    "batchable",
    [
        True,
        False,
    ],
)
def test_invalid_item_is_refused_alone_on_either_path(
    reg: Registry, ca: MemoryCa, batchable: bool
) -> None:
    devices = provision(reg, 4)
    items = [token_item(ca, d) for d in devices[:3]]
    items[1] = replace(items[1], now=NOW.replace(tzinfo=None))
    if not batchable:
        old = token_item(ca, devices[3])
        reg.record_issuances([old])
        items.append(Issuance(issued(ca, devices[3].value), None, old.cert.serial, NOW, "re"))
    outcomes = reg.record_issuances(items)
    assert isinstance(outcomes[1], InvalidValue)
    assert [outcomes[0], *outcomes[2:]] == [None] * (len(items) - 1)
    assert_no_trace(reg, devices[1], own_token(devices[1]))


# ---------------------------------------------------------------- record_issuance (single)


def test_single_record_issuance_raises_the_refusal(reg: Registry, ca: MemoryCa) -> None:
    devices = provision(reg, 3)

    def single(item: Issuance) -> None:
        reg.record_issuance(
            item.cert,
            consume_token_hash=item.consume_token_hash,
            supersedes_serial=item.supersedes_serial,
            now=item.now,
            actor=item.actor,
        )

    first = token_item(ca, devices[0])
    single(first)
    assert_recorded(reg, first)
    with pytest.raises(TokenRejected) as used:
        single(token_item(ca, devices[0]))
    assert used.value.reason == "used"
    with pytest.raises(TokenRejected) as expired:
        single(token_item(ca, devices[1], now=NOW + TTL))
    assert expired.value.reason == "expired"
    reg.suspend_device(devices[2], now=NOW, actor="op")
    with pytest.raises(DeviceNotActive) as inactive:
        single(token_item(ca, devices[2]))
    assert inactive.value.state == "suspended"
    with pytest.raises(DuplicateSerial):
        cert = replace(issued(ca, devices[1].value), serial=first.cert.serial)
        single(Issuance(cert, own_token(devices[1]), None, NOW, "est"))
    with pytest.raises(UnknownDevice):
        single(Issuance(issued(ca, "ghost"), None, None, NOW, "est"))
    assert len(issued_events(reg)) == 1
    assert_no_trace(reg, devices[1], own_token(devices[1]))
