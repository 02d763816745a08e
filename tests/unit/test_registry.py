"""Fleet registry on real SQLite files: schema, batches, tokens, issuance, revocation, events."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from enroll_server.pki.profile import DeviceProfile
from enroll_server.registry import (
    CertStatus,
    DeviceNotActive,
    DeviceState,
    DuplicateBatch,
    DuplicateDevice,
    DuplicateOperator,
    DuplicateSerial,
    EventKind,
    InvalidValue,
    IssuedCertificate,
    LastAdmin,
    NewDevice,
    OperatorRole,
    Registry,
    SchemaTooNew,
    TokenRejected,
    UnknownBatch,
    UnknownCertificate,
    UnknownDevice,
    UnknownOperator,
    parse_reason,
    schema,
)
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa, issued_record

NOW = datetime.now(UTC).replace(microsecond=0)
TTL = timedelta(days=7)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issued(
    ca: MemoryCa, device: str, *, now: datetime = NOW, validity: timedelta = timedelta(days=30)
) -> IssuedCertificate:
    """A real certificate from the test CA, as the service hands it to the registry."""
    cert, _ = ca.device_cert(
        device, now=now, profile=DeviceProfile(validity=validity, backdate=timedelta(minutes=5))
    )
    return issued_record(cert, device)


def new_devices(prefix: str, count: int, start: int = 0) -> Iterator[NewDevice]:
    for i in range(start, start + count):
        name = f"{prefix}-{i:06d}"
        yield NewDevice(DeviceId(name), token_hash(f"token-{name}"))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def reg(registry_location: Path | str) -> Iterator[Registry]:
    """The registry on each backend in turn (conftest.registry_location)."""
    registry = Registry.open(registry_location)
    yield registry
    registry.close()


@pytest.fixture
def sqlite_reg(db_path: Path) -> Iterator[Registry]:
    """For tests that look into the SQLite file itself (WAL, query plans, old schemas)."""
    registry = Registry.open(db_path)
    yield registry
    registry.close()


def run_raw(location: Path | str, statement: str) -> None:
    """Run one statement on the database behind the registry, bypassing it (autocommit)."""
    if isinstance(location, Path):
        with closing(sqlite3.connect(location)) as raw:
            raw.execute(statement)
            raw.commit()
        return
    import psycopg

    with psycopg.connect(location, autocommit=True) as raw:
        raw.execute(statement)  # type: ignore[arg-type]


def enroll(reg: Registry, ca: MemoryCa, device: str, *, now: datetime = NOW) -> IssuedCertificate:
    """Register a device with a token and record its first certificate."""
    reg.add_device(DeviceId(device), batch_id=None, now=now, actor="op")
    reg.add_token(DeviceId(device), token_hash(device), now + TTL, now)
    cert = issued(ca, device, now=now)
    reg.record_issuance(
        cert, consume_token_hash=token_hash(device), supersedes_serial=None, now=now, actor="est"
    )
    return cert


# ---------------------------------------------------------------- schema and connection


def test_fresh_registry_is_wal_with_every_table(sqlite_reg: Registry, db_path: Path) -> None:
    assert sqlite_reg.journal_mode == "wal"
    db = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables >= {
            "devices",
            "certificates",
            "tokens",
            "batches",
            "audit",
            "events",
            "operators",
            "schema_version",
        }
        version = db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        assert version == schema.LATEST_VERSION
        # persistent: a second connection sees it too
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_reopen_keeps_data_and_does_not_migrate_again(db_path: Path) -> None:
    with Registry.open(db_path) as first:
        first.add_device(DeviceId("keep-me"), batch_id=None, now=NOW, actor="op")
    with Registry.open(db_path) as second:
        device = second.get_device(DeviceId("keep-me"))
        assert device is not None and device.state is DeviceState.PROVISIONED
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(
            schema.MIGRATIONS
        )


def test_newer_schema_is_refused(db_path: Path) -> None:
    Registry.open(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, 'x')",
            (schema.LATEST_VERSION + 1,),
        )
    with pytest.raises(SchemaTooNew) as info:
        Registry.open(db_path)
    newer = schema.LATEST_VERSION + 1
    assert (info.value.found, info.value.known) == (newer, schema.LATEST_VERSION)
    assert str(newer) in str(info.value)


def test_older_schema_gets_missing_migrations(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry.open(db_path).close()
    nxt = schema.LATEST_VERSION + 1
    v_next = schema.Migration(nxt, "notes", ("CREATE TABLE notes (id INTEGER PRIMARY KEY)",))
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, v_next))
    monkeypatch.setattr(schema, "LATEST_VERSION", nxt)
    Registry.open(db_path).close()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT max(version) FROM schema_version").fetchone()[0] == nxt
        assert raw.execute("SELECT count(*) FROM notes").fetchone()[0] == 0


def test_failed_migration_leaves_the_file_untouched(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry.open(db_path).close()
    nxt = schema.LATEST_VERSION + 1
    broken = schema.Migration(
        nxt, "broken", ("CREATE TABLE half_done (id INTEGER)", "CREATE TABLE devices (x INTEGER)")
    )
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    monkeypatch.setattr(schema, "LATEST_VERSION", nxt)
    with pytest.raises(sqlite3.OperationalError):
        Registry.open(db_path)
    with sqlite3.connect(db_path) as raw:
        version = raw.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        assert version == nxt - 1
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master")}
        assert "half_done" not in tables


def test_foreign_keys_enforced(reg: Registry) -> None:
    with pytest.raises(UnknownBatch):
        reg.add_device(DeviceId("orphan"), batch_id="no-such-batch", now=NOW, actor="op")
    assert reg.get_device(DeviceId("orphan")) is None


def test_naive_datetimes_are_refused(reg: Registry) -> None:
    with pytest.raises(InvalidValue, match="timezone-aware"):
        reg.add_device(DeviceId("naive"), batch_id=None, now=datetime(2025, 1, 1), actor="op")


# ---------------------------------------------------------------- batches


def test_create_batch_is_all_or_nothing_on_registered_duplicate(reg: Registry) -> None:
    reg.add_device(DeviceId("lot-003000"), batch_id=None, now=NOW, actor="op")
    audit_before = len(reg.audit_log(limit=1000))
    # 3000 lies in the second internal chunk: the first chunk must be rolled back too.
    with pytest.raises(DuplicateDevice) as info:
        reg.create_batch(
            "lot", new_devices("lot", 5000), kind="token", token_ttl=TTL, now=NOW, actor="op"
        )
    assert info.value.device_id == DeviceId("lot-003000")
    assert "lot-003000" in str(info.value)
    assert reg.get_batch("lot") is None
    assert reg.count_devices() == 1
    assert reg.list_devices(batch_id="lot") == []
    with pytest.raises(TokenRejected) as rejected:
        reg.check_token(DeviceId("lot-000001"), token_hash("token-lot-000001"), NOW)
    assert rejected.value.reason == "unknown"
    assert len(reg.audit_log(limit=1000)) == audit_before


def test_create_batch_rejects_duplicate_inside_input(reg: Registry) -> None:
    def devices() -> Iterator[NewDevice]:
        yield from new_devices("twin", 2500)
        yield NewDevice(DeviceId("twin-000010"), token_hash("other"))

    with pytest.raises(DuplicateDevice) as info:
        reg.create_batch("twins", devices(), kind="token", token_ttl=TTL, now=NOW, actor="op")
    assert info.value.device_id == DeviceId("twin-000010")
    assert reg.count_devices() == 0
    assert reg.list_batches() == []


def test_duplicate_batch_id(reg: Registry) -> None:
    reg.create_batch("b", new_devices("b", 2), kind="token", token_ttl=TTL, now=NOW, actor="op")
    with pytest.raises(DuplicateBatch):
        reg.create_batch("b", new_devices("c", 2), kind="token", token_ttl=TTL, now=NOW, actor="op")
    assert reg.count_devices() == 2


def test_create_batch_of_100k_devices(reg: Registry) -> None:
    count = reg.create_batch(
        "factory-1",
        new_devices("f1", 100_000),
        kind="token",
        token_ttl=TTL,
        now=NOW,
        actor="op",
        note="line 3",
    )
    assert count == 100_000
    batch = reg.get_batch("factory-1")
    assert batch is not None
    assert (batch.device_count, batch.token_ttl, batch.note) == (100_000, TTL, "line 3")
    assert reg.batch_counts("factory-1", NOW)["provisioned"] == 100_000
    page = reg.list_devices(batch_id="factory-1", limit=3, offset=99_998)
    assert [d.device_id.value for d in page] == ["f1-099998", "f1-099999"]
    last = DeviceId("f1-099999")
    reg.check_token(last, token_hash("token-f1-099999"), NOW)
    device = reg.get_device(last)
    assert device is not None and device.token_expires_at == NOW + TTL


def test_batch_counts(reg: Registry, ca: MemoryCa) -> None:
    early = NOW - timedelta(days=1)
    devices = [
        NewDevice(DeviceId(f"bc-{i}"), token_hash(f"bc-{i}"), None if i else early)
        for i in range(6)
    ]
    reg.create_batch("bc", devices, kind="token", token_ttl=TTL, now=NOW - TTL, actor="op")
    for i in (1, 2, 3, 4):
        d = DeviceId(f"bc-{i}")
        reg.record_issuance(
            issued(ca, d.value),
            consume_token_hash=token_hash(d.value),
            supersedes_serial=None,
            now=NOW - timedelta(days=2),
            actor="est",
        )
    # bc-0's token expires a day before NOW; bc-5's exactly at NOW (no longer valid at NOW).
    assert reg.batch_counts("bc", NOW - timedelta(days=2)) == {
        "provisioned": 2,
        "token_expired": 0,
        "enrolled": 4,
        "suspended": 0,
        "revoked": 0,
        "total": 6,
    }
    reg.suspend_device(DeviceId("bc-3"), now=NOW, actor="op")
    reg.revoke_device(DeviceId("bc-4"), reason="keyCompromise", now=NOW, actor="op")
    assert reg.batch_counts("bc", NOW) == {
        "provisioned": 0,
        "token_expired": 2,
        "enrolled": 2,
        "suspended": 1,
        "revoked": 1,
        "total": 6,
    }
    with pytest.raises(UnknownBatch):
        reg.batch_counts("nope", NOW)


def test_list_devices_filters(reg: Registry) -> None:
    reg.create_batch("lf", new_devices("lf", 3), kind="token", token_ttl=TTL, now=NOW, actor="op")
    reg.add_device(DeviceId("backend"), role="service", batch_id=None, now=NOW, actor="op")
    assert [d.device_id.value for d in reg.list_devices(role="service")] == ["backend"]
    assert len(reg.list_devices(state="provisioned")) == 4
    assert len(reg.list_devices(batch_id="lf", limit=2)) == 2
    with pytest.raises(InvalidValue, match="bogus"):
        reg.list_devices(state="bogus")


# ---------------------------------------------------------------- tokens


def test_check_token_reasons(reg: Registry, ca: MemoryCa) -> None:
    a, b = DeviceId("tok-a"), DeviceId("tok-b")
    for d in (a, b):
        reg.add_device(d, batch_id=None, now=NOW, actor="op")
    reg.add_token(a, token_hash("ta"), NOW + TTL, NOW)
    reg.add_token(b, token_hash("tb"), NOW + TTL, NOW)
    reg.check_token(a, token_hash("ta"), NOW)

    def reason(device: DeviceId, token: str, now: datetime = NOW) -> str:
        with pytest.raises(TokenRejected) as info:
            reg.check_token(device, token_hash(token), now)
        assert str(device) in str(info.value)
        return info.value.reason

    assert reason(a, "nope") == "unknown"
    assert reason(a, "tb") == "wrong-device"
    assert reason(a, "ta", NOW + TTL) == "expired"
    reg.record_issuance(
        issued(ca, "tok-a"),
        consume_token_hash=token_hash("ta"),
        supersedes_serial=None,
        now=NOW,
        actor="est",
    )
    assert reason(a, "ta") == "used"


def test_check_token_holder_reads_token_and_device_at_once(reg: Registry, ca: MemoryCa) -> None:
    a, b = DeviceId("holder-a"), DeviceId("holder-b")
    reg.add_device(a, batch_id=None, now=NOW, actor="op")
    reg.add_device(b, role="service", batch_id=None, now=NOW, actor="op")
    reg.add_token(a, token_hash("ha"), NOW + TTL, NOW)
    reg.add_token(b, token_hash("hb"), NOW + TTL, NOW)
    holder = reg.check_token_holder(a, token_hash("ha"), NOW)
    assert (holder.device_id, holder.role.value, holder.state) == (
        a,
        "device",
        DeviceState.PROVISIONED,
    )
    assert reg.check_token_holder(b, token_hash("hb"), NOW).role.value == "service"
    reg.suspend_device(b, now=NOW, actor="op")
    assert reg.check_token_holder(b, token_hash("hb"), NOW).state is DeviceState.SUSPENDED

    def reason(device: DeviceId, token: str, now: datetime = NOW) -> str:
        with pytest.raises(TokenRejected) as info:
            reg.check_token_holder(device, token_hash(token), now)
        return info.value.reason

    # The same reasons, in the same cases, as check_token.
    assert reason(a, "nope") == "unknown"
    assert reason(a, "hb") == "wrong-device"
    assert reason(a, "ha", NOW + TTL) == "expired"
    reg.record_issuance(
        issued(ca, "holder-a"),
        consume_token_hash=token_hash("ha"),
        supersedes_serial=None,
        now=NOW,
        actor="est",
    )
    assert reason(a, "ha") == "used"


def test_issue_audit_detail_is_what_detail_json_writes(reg: Registry, ca: MemoryCa) -> None:
    from enroll_server.registry.codec import detail_json
    from enroll_server.registry.issuance import _issue_detail

    for supersedes, with_token in ((None, True), ("0abc", False)):
        assert _issue_detail("1f", "2030-01-02T03:04:05.000006Z", supersedes, with_token) == (
            detail_json(
                {
                    "serial": "1f",
                    "not_after": "2030-01-02T03:04:05.000006Z",
                    "supersedes": supersedes,
                    "with_token": with_token,
                }
            )
        )
    cert = enroll(reg, ca, "detail-1")
    entry = reg.audit_log(device_id=DeviceId("detail-1"), limit=1)[0]
    assert entry.detail == {
        "serial": format(cert.serial, "x"),
        "not_after": cert.not_after.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "supersedes": None,
        "with_token": True,
    }


def test_timestamps_are_fixed_width_utc() -> None:
    from enroll_server.registry.codec import ts

    plus_two = timezone(timedelta(hours=2))
    assert ts(datetime(2030, 1, 2, 5, 4, 5, tzinfo=plus_two)) == "2030-01-02T03:04:05.000000Z"
    assert ts(datetime(2030, 1, 2, 3, 4, 5, 7, tzinfo=UTC)) == "2030-01-02T03:04:05.000007Z"
    with pytest.raises(InvalidValue):
        ts(datetime(2030, 1, 2))  # naive
    # The field formatting agrees with strftime, and its order is time order.
    from enroll_server.registry.codec import _FORMAT

    moments = [
        datetime(2026, 11, 27, 23, 59, 59, 999999, tzinfo=UTC) + timedelta(microseconds=k**3)
        for k in range(-3000, 3000, 7)
    ]
    assert [ts(m) for m in moments] == [m.strftime(_FORMAT) for m in moments]
    assert sorted(ts(m) for m in reversed(moments)) == [ts(m) for m in moments]
    zero = timezone(timedelta(0))  # UTC by offset, not the UTC object: the slow path
    assert ts(datetime(2030, 1, 2, tzinfo=zero)) == "2030-01-02T00:00:00.000000Z"


def test_reissued_token_kills_the_old_one(reg: Registry) -> None:
    d = DeviceId("reissue")
    reg.add_device(d, batch_id=None, now=NOW, actor="op")
    reg.add_token(d, token_hash("old"), NOW + TTL, NOW)
    reg.add_token(d, token_hash("new"), NOW + 2 * TTL, NOW)
    with pytest.raises(TokenRejected):
        reg.check_token(d, token_hash("old"), NOW)
    reg.check_token(d, token_hash("new"), NOW)
    device = reg.get_device(d)
    assert device is not None and device.token_expires_at == NOW + 2 * TTL


def _race_worker(
    path: str, device: str, cert_args: tuple[int, str, str], token: str, now: datetime
) -> str:
    serial, fingerprint, pem = cert_args
    with Registry.open(path) as reg:
        cert = IssuedCertificate(
            serial, DeviceId(device), fingerprint, now, now + timedelta(days=1), pem
        )
        try:
            reg.record_issuance(
                cert, consume_token_hash=token, supersedes_serial=None, now=now, actor="est"
            )
        except TokenRejected as exc:
            return exc.reason
    return "ok"


def test_token_consumed_once_by_racing_threads(registry_location: Path | str, ca: MemoryCa) -> None:
    db_path = registry_location
    d = DeviceId("racer")
    with Registry.open(db_path) as reg:
        reg.add_device(d, batch_id=None, now=NOW, actor="op")
        reg.add_token(d, token_hash("race"), NOW + TTL, NOW)
    certs = [issued(ca, "racer") for _ in range(4)]
    registries = [Registry.open(db_path) for _ in certs]  # one connection each
    start = threading.Barrier(len(certs))
    results: list[str] = []

    def attempt(reg: Registry, cert: IssuedCertificate) -> None:
        start.wait(timeout=10)
        try:
            reg.record_issuance(
                cert,
                consume_token_hash=token_hash("race"),
                supersedes_serial=None,
                now=NOW,
                actor="est",
            )
            results.append("ok")
        except TokenRejected as exc:
            results.append(exc.reason)

    threads = [threading.Thread(target=attempt, args=pair) for pair in zip(registries, certs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for r in registries:
        r.close()
    assert sorted(results) == ["ok", "used", "used", "used"]
    with Registry.open(db_path) as reg:
        assert len(reg.certificates_of(d)) == 1


def test_token_consumed_once_by_racing_processes(registry_location: Path | str) -> None:
    db_path = registry_location
    d = DeviceId("proc-racer")
    with Registry.open(db_path) as reg:
        reg.add_device(d, batch_id=None, now=NOW, actor="op")
        reg.add_token(d, token_hash("race"), NOW + TTL, NOW)
    args = [
        (str(db_path), d.value, (1000 + i, token_hash(f"fp{i}"), "PEM"), token_hash("race"), NOW)
        for i in range(3)
    ]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap_async(_race_worker, args).get(timeout=60)
    assert sorted(results) == ["ok", "used", "used"]
    with Registry.open(db_path) as reg:
        assert len(reg.certificates_of(d)) == 1


# ---------------------------------------------------------------- issuance


def test_record_issuance_stores_the_certificate(reg: Registry, ca: MemoryCa) -> None:
    cert = enroll(reg, ca, "cam-1")
    record = reg.get_certificate(cert.serial)
    assert record is not None
    assert record.status is CertStatus.ACTIVE
    assert record.device_id == DeviceId("cam-1")
    parsed = x509.load_pem_x509_certificate(record.pem.encode())
    assert parsed.serial_number == cert.serial
    assert parsed.fingerprint(hashes.SHA256()).hex() == record.fingerprint_sha256
    assert record.not_after == parsed.not_valid_after_utc
    device = reg.get_device(DeviceId("cam-1"))
    assert device is not None
    assert (device.state, device.enrolled_at) == (DeviceState.ACTIVE, NOW)
    # Recorded in the audit log; the events journal is for what pollers must react to.
    assert reg.events_since(0) == []
    (entry,) = reg.audit_log(device_id=DeviceId("cam-1"), limit=1)
    assert entry.action == "certificate.issue"
    assert int(entry.detail["serial"], 16) == cert.serial


def test_serial_is_unique(reg: Registry, ca: MemoryCa) -> None:
    # RFC 5280 4.1.2.2: unique per CA, kept by the database (the PRIMARY KEY). The same
    # certificate recorded twice is refused by it too: its DER, hence its fingerprint,
    # holds its serial.
    first = enroll(reg, ca, "uniq")
    d = DeviceId("uniq")
    for again in (
        IssuedCertificate(first.serial, d, token_hash("other"), NOW, NOW + TTL, first.pem),
        first,
    ):
        with pytest.raises(DuplicateSerial) as info:
            reg.record_issuance(
                again, consume_token_hash=None, supersedes_serial=None, now=NOW, actor="est"
            )
        assert info.value.serial == first.serial
    assert [c.serial for c in reg.certificates_of(d)] == [first.serial]


def test_failed_issuance_does_not_consume_the_token(reg: Registry, ca: MemoryCa) -> None:
    first = enroll(reg, ca, "keeper")
    d = DeviceId("keeper")
    reg.add_token(d, token_hash("second"), NOW + TTL, NOW)
    clash = IssuedCertificate(first.serial, d, token_hash("x"), NOW, NOW + TTL, "PEM")
    with pytest.raises(DuplicateSerial):
        reg.record_issuance(
            clash,
            consume_token_hash=token_hash("second"),
            supersedes_serial=None,
            now=NOW,
            actor="est",
        )
    reg.check_token(d, token_hash("second"), NOW)  # still usable


def test_issuance_refused_for_suspended_and_revoked_devices(reg: Registry, ca: MemoryCa) -> None:
    enroll(reg, ca, "bad")
    d = DeviceId("bad")
    reg.add_token(d, token_hash("again"), NOW + TTL, NOW)
    reg.suspend_device(d, now=NOW, actor="op")
    with pytest.raises(DeviceNotActive) as info:
        reg.record_issuance(
            issued(ca, "bad"),
            consume_token_hash=token_hash("again"),
            supersedes_serial=None,
            now=NOW,
            actor="est",
        )
    assert info.value.state == "suspended"
    reg.check_token(d, token_hash("again"), NOW)  # rolled back with the refusal
    reg.revoke_device(d, reason="keyCompromise", now=NOW, actor="op")
    with pytest.raises(DeviceNotActive, match="revoked"):
        reg.record_issuance(
            issued(ca, "bad"),
            consume_token_hash=None,
            supersedes_serial=None,
            now=NOW,
            actor="est",
        )
    with pytest.raises(UnknownDevice):
        reg.record_issuance(
            issued(ca, "ghost"),
            consume_token_hash=None,
            supersedes_serial=None,
            now=NOW,
            actor="est",
        )


def test_renewal_supersedes_the_old_certificate(reg: Registry, ca: MemoryCa) -> None:
    old = enroll(reg, ca, "renew")
    new = issued(ca, "renew")
    later = NOW + timedelta(days=20)
    reg.record_issuance(
        new, consume_token_hash=None, supersedes_serial=old.serial, now=later, actor="est"
    )
    statuses = {c.serial: c.status for c in reg.certificates_of(DeviceId("renew"))}
    assert statuses == {old.serial: CertStatus.SUPERSEDED, new.serial: CertStatus.ACTIVE}
    device = reg.get_device(DeviceId("renew"))
    assert device is not None and device.enrolled_at == NOW  # first enrollment is kept
    with pytest.raises(UnknownCertificate):
        reg.record_issuance(
            issued(ca, "renew"),
            consume_token_hash=None,
            supersedes_serial=12345,
            now=later,
            actor="est",
        )
    # A compromise revokes every certificate still within its validity, superseded included.
    revoked = reg.revoke_device(DeviceId("renew"), reason="key-compromise", now=later, actor="op")
    assert sorted(revoked) == sorted([old.serial, new.serial])


# ---------------------------------------------------------------- revocation


def test_suspend_resume_revoke_transitions(reg: Registry, ca: MemoryCa) -> None:
    cert = enroll(reg, ca, "door")
    d = DeviceId("door")
    seq = reg.last_event_seq()

    assert reg.suspend_device(d, now=NOW, actor="op") == [cert.serial]
    record = reg.get_certificate(cert.serial)
    assert record is not None and record.status is CertStatus.ON_HOLD
    assert record.revocation_reason == "certificateHold"
    assert [(e.serial, e.reason) for e in reg.revoked_entries(NOW)] == [
        (cert.serial, "certificateHold")
    ]
    assert reg.suspend_device(d, now=NOW, actor="op") == []  # idempotent

    assert reg.resume_device(d, now=NOW, actor="op") == [cert.serial]
    record = reg.get_certificate(cert.serial)
    assert record is not None and record.status is CertStatus.ACTIVE
    assert record.revoked_at is None and record.revocation_reason is None
    assert reg.revoked_entries(NOW) == []
    device = reg.get_device(d)
    assert device is not None and device.state is DeviceState.ACTIVE

    at = NOW + timedelta(hours=1)
    assert reg.revoke_device(d, reason="keyCompromise", now=at, actor="op") == [cert.serial]
    record = reg.get_certificate(cert.serial)
    assert record is not None
    assert (record.status, record.revoked_at, record.revocation_reason) == (
        CertStatus.REVOKED,
        at,
        "keyCompromise",
    )
    device = reg.get_device(d)
    assert device is not None and device.state is DeviceState.REVOKED
    with pytest.raises(DeviceNotActive):
        reg.resume_device(d, now=at, actor="op")
    with pytest.raises(DeviceNotActive):
        reg.suspend_device(d, now=at, actor="op")

    events = reg.events_since(seq)
    assert [(e.kind, e.device_id, e.serials) for e in events] == [
        (EventKind.SUSPENDED, d, (cert.serial,)),
        (EventKind.RESUMED, d, (cert.serial,)),
        (EventKind.REVOKED, d, (cert.serial,)),
    ]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    actions = [a.action for a in reg.audit_log(device_id=d, limit=3)]
    assert actions == ["device.revoke", "device.resume", "device.suspend"]


def test_revoke_unknown_device_and_bad_reason(reg: Registry) -> None:
    with pytest.raises(UnknownDevice, match="ghost"):
        reg.revoke_device(DeviceId("ghost"), reason="keyCompromise", now=NOW, actor="op")
    reg.add_device(DeviceId("real"), batch_id=None, now=NOW, actor="op")
    with pytest.raises(InvalidValue, match="whim"):
        reg.revoke_device(DeviceId("real"), reason="whim", now=NOW, actor="op")
    with pytest.raises(InvalidValue):
        reg.revoke_device(DeviceId("real"), reason="certificateHold", now=NOW, actor="op")
    assert parse_reason("cessation-of-operation") == "cessationOfOperation"
    assert parse_reason("CA_COMPROMISE") == "cACompromise"


def test_revoked_entries_exclude_expired_certificates(reg: Registry, ca: MemoryCa) -> None:
    short = DeviceId("short")
    reg.add_device(short, batch_id=None, now=NOW, actor="op")
    cert = issued(ca, "short", validity=timedelta(hours=1))
    reg.record_issuance(cert, consume_token_hash=None, supersedes_serial=None, now=NOW, actor="e")
    long_lived = enroll(reg, ca, "long")
    for d in (short, DeviceId("long")):
        reg.revoke_device(d, reason="keyCompromise", now=NOW, actor="op")
    assert {e.serial for e in reg.revoked_entries(NOW)} == {cert.serial, long_lived.serial}
    later = cert.not_after + timedelta(seconds=1)
    assert [e.serial for e in reg.revoked_entries(later)] == [long_lived.serial]
    # Revoking after expiry changes nothing on the CRL.
    reg.add_device(DeviceId("expired"), batch_id=None, now=NOW, actor="op")
    gone = issued(ca, "expired", validity=timedelta(hours=1))
    reg.record_issuance(gone, consume_token_hash=None, supersedes_serial=None, now=NOW, actor="e")
    assert reg.revoke_device(DeviceId("expired"), reason="superseded", now=later, actor="op") == []


def test_revoke_batch_in_chunks_with_progress(reg: Registry, ca: MemoryCa) -> None:
    reg.create_batch("rb", new_devices("rb", 1200), kind="token", token_ttl=TTL, now=NOW, actor="o")
    enrolled = issued(ca, "rb-000007")
    reg.record_issuance(
        enrolled,
        consume_token_hash=token_hash("token-rb-000007"),
        supersedes_serial=None,
        now=NOW,
        actor="est",
    )
    reg.revoke_device(DeviceId("rb-000001"), reason="keyCompromise", now=NOW, actor="op")
    seen: list[int] = []
    seq = reg.last_event_seq()
    total = reg.revoke_batch(
        "rb", reason="cessation-of-operation", now=NOW, actor="op", progress=seen.append
    )
    assert total == 1199
    assert seen[-1] == 1199 and seen == sorted(seen) and len(seen) >= 3
    assert reg.batch_counts("rb", NOW)["revoked"] == 1200
    record = reg.get_certificate(enrolled.serial)
    assert record is not None and record.revocation_reason == "cessationOfOperation"
    assert len(reg.events_since(seq)) == 1199
    with pytest.raises(UnknownBatch):
        reg.revoke_batch("nope", reason="keyCompromise", now=NOW, actor="op")


def test_crl_number_increases_across_instances(registry_location: Path | str) -> None:
    db_path = registry_location
    with Registry.open(db_path) as a, Registry.open(db_path) as b:
        numbers = [a.crl_number_next(), b.crl_number_next(), a.crl_number_next()]
    assert numbers == [1, 2, 3]
    with Registry.open(db_path) as c:
        assert c.crl_number_next() == 4


# ---------------------------------------------------------------- events and audit


def test_events_from_another_instance(registry_location: Path | str, ca: MemoryCa) -> None:
    db_path = registry_location
    with Registry.open(db_path) as writer, Registry.open(db_path) as watcher:
        cert = enroll(writer, ca, "remote")
        cursor = watcher.last_event_seq()
        assert watcher.events_since(cursor) == []
        writer.revoke_device(DeviceId("remote"), reason="keyCompromise", now=NOW, actor="cli")
        events = watcher.events_since(cursor)
        assert [(e.kind, e.device_id, e.serials) for e in events] == [
            (EventKind.REVOKED, DeviceId("remote"), (cert.serial,))
        ]
        assert watcher.last_event_seq() == events[-1].seq
        assert watcher.events_since(events[-1].seq) == []


def test_audit_is_append_only(reg: Registry, registry_location: Path | str) -> None:
    reg.append_audit(
        actor="op", action="note", device_id=None, detail={"why": "test", "n": 1}, now=NOW
    )
    entry = reg.audit_log(limit=1)[0]
    assert (entry.actor, entry.action, entry.detail, entry.at) == (
        "op",
        "note",
        {"why": "test", "n": 1},
        NOW,
    )
    # The database refuses, whoever asks: the registry's own login included.
    refused: tuple[type[Exception], ...] = (sqlite3.DatabaseError,)
    statements = ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"]
    if isinstance(registry_location, str):
        import psycopg

        refused = (psycopg.errors.IntegrityError,)
        statements.append("TRUNCATE audit")
    for statement in statements:
        with pytest.raises(refused, match="append-only"):
            run_raw(registry_location, statement)
    assert reg.audit_log(limit=1)[0].actor == "op"


def test_audit_log_filters_by_device_newest_first(reg: Registry) -> None:
    for name in ("a1", "a2"):
        reg.add_device(DeviceId(name), batch_id=None, now=NOW, actor="op")
    reg.append_audit(actor="op", action="poke", device_id=DeviceId("a1"), detail={}, now=NOW)
    assert [e.action for e in reg.audit_log(device_id=DeviceId("a1"))] == ["poke", "device.add"]
    assert len(reg.audit_log(limit=2)) == 2


def test_operators_add_rotate_remove(reg: Registry) -> None:
    reg.add_operator("alice", OperatorRole.ADMIN, token_hash("a1"), NOW, actor="cli")
    reg.add_operator("victor", OperatorRole.VIEWER, token_hash("v1"), NOW, actor="cli")
    creds = {c.operator.name: c for c in reg.operator_credentials()}
    assert creds["alice"].token_hash == token_hash("a1")
    assert creds["victor"].operator.role is OperatorRole.VIEWER
    with pytest.raises(DuplicateOperator):
        reg.add_operator("alice", OperatorRole.VIEWER, token_hash("a2"), NOW, actor="cli")
    with pytest.raises(InvalidValue, match="already registered"):
        reg.add_operator("bob", OperatorRole.ADMIN, token_hash("a1"), NOW, actor="cli")
    with pytest.raises(InvalidValue, match="operator name"):
        reg.add_operator("bad name", OperatorRole.ADMIN, token_hash("b"), NOW, actor="cli")
    with pytest.raises(InvalidValue):
        reg.add_operator("bob", OperatorRole.ADMIN, "not-a-hash", NOW, actor="cli")
    reg.rotate_operator("alice", token_hash("a2"), NOW, actor="cli")
    creds = {c.operator.name: c for c in reg.operator_credentials()}
    assert creds["alice"].token_hash == token_hash("a2")
    assert creds["alice"].operator.rotated_at == NOW
    with pytest.raises(UnknownOperator):
        reg.rotate_operator("nobody", token_hash("x"), NOW, actor="cli")
    with pytest.raises(LastAdmin):
        reg.remove_operator("alice", NOW, actor="cli")
    reg.remove_operator("victor", NOW, actor="cli")
    with pytest.raises(UnknownOperator):
        reg.remove_operator("victor", NOW, actor="cli")
    assert [o.name for o in reg.list_operators()] == ["alice"]
    actions = [e.action for e in reg.audit_log(limit=10)]
    assert actions[:4] == ["operator.remove", "operator.rotate", "operator.add", "operator.add"]


def test_schema_6_turns_admin_tokens_into_operators(db_path: Path) -> None:
    """A registry from before operators: the newest admin token becomes operator 'admin',
    older ones 'admin-legacy-<n>', all still valid until removed."""
    with sqlite3.connect(db_path) as raw:
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT)")
        for migration in schema.MIGRATIONS[:5]:
            for statement in migration.statements:
                raw.execute(statement)
            raw.execute("INSERT INTO schema_version VALUES (?, 'x')", (migration.version,))
        for secret in ("first", "second"):
            raw.execute(
                "INSERT INTO admin_tokens (token_hash, name, created_at) VALUES (?, 'init', ?)",
                (token_hash(secret), "2026-01-01T00:00:00.000000Z"),
            )
    with Registry.open(db_path) as reg:
        creds = {c.operator.name: c.token_hash for c in reg.operator_credentials()}
    assert creds == {"admin": token_hash("second"), "admin-legacy-1": token_hash("first")}


def _open_and_add(path: str, device: str, now: datetime) -> str:
    with Registry.open(Path(path)) as reg:
        reg.add_device(DeviceId(device), batch_id=None, now=now, actor="proc")
        return reg.journal_mode


def test_processes_opening_a_fresh_file_together(db_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    args = [(str(db_path), f"p-{i}", NOW) for i in range(4)]
    with ctx.Pool(4) as pool:
        modes = pool.starmap_async(_open_and_add, args).get(timeout=60)
    assert modes == ["wal"] * 4
    with Registry.open(db_path) as reg:
        assert reg.count_devices() == 4
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(
            schema.MIGRATIONS
        )


def test_create_batch_reads_the_input_lazily(reg: Registry) -> None:
    def endless() -> Iterator[NewDevice]:
        yield NewDevice(DeviceId("lazy-0"), token_hash("lazy-0"))
        i = 0
        while True:  # would never end if create_batch materialized its input
            i += 1
            name = "lazy-0" if i == 5 else f"lazy-{i}"
            yield NewDevice(DeviceId(name), token_hash(f"t{i}"))

    with pytest.raises(DuplicateDevice):
        reg.create_batch("lazy", endless(), kind="token", token_ttl=TTL, now=NOW, actor="op")
    assert reg.count_devices() == 0


def test_hot_queries_use_indexes(sqlite_reg: Registry, db_path: Path) -> None:
    # The broker polls events_since every ~200 ms and the CRL is rebuilt from
    # revoked_entries: neither may scan a table of 100k rows.
    with sqlite3.connect(db_path) as raw:

        def plan(sql: str) -> str:
            return " ".join(r[3] for r in raw.execute("EXPLAIN QUERY PLAN " + sql))

        assert "INTEGER PRIMARY KEY" in plan("SELECT * FROM events WHERE seq > 1 ORDER BY seq")
        assert "certificates_revoked" in plan(
            "SELECT serial FROM certificates WHERE status IN ('revoked', 'on_hold') "
            "AND not_after > '2025'"
        )
        assert "tokens_device" in plan("SELECT 1 FROM tokens WHERE device_id = 'x'")


def test_v1_registry_migrates_to_the_enrollment_friendly_indexes(db_path: Path) -> None:
    """A registry made by schema 1 gains the indexes of schema 2 with its data intact
    (test_hot_queries_use_indexes checks the CRL query still uses an index)."""
    with sqlite3.connect(db_path) as raw:
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT)")
        for statement in schema.MIGRATIONS[0].statements:
            raw.execute(statement)
        raw.execute("INSERT INTO schema_version VALUES (1, 'x')")
        raw.execute(
            "INSERT INTO devices (id, batch_id, role, state, created_at, updated_at) "
            "VALUES ('old-dev', NULL, 'device', 'provisioned', '2026-01-01T00:00:00.000000Z', "
            "'2026-01-01T00:00:00.000000Z')"
        )
    with Registry.open(db_path) as reg:
        assert reg.get_device(DeviceId("old-dev")) is not None
    with sqlite3.connect(db_path) as raw:
        names = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"devices_batch", "certificates_revoked"} <= names
        assert not {"devices_state", "devices_batch_state", "certificates_status_expiry"} & names


def test_revocation_events_since_skips_issuances_and_moves_past_them(
    sqlite_reg: Registry, ca: MemoryCa, db_path: Path
) -> None:
    """Registries written before issuances left the events journal hold 'issued' events."""
    reg = sqlite_reg

    def enroll_old_style(device: str) -> None:
        cert = enroll(reg, ca, device)
        with closing(sqlite3.connect(db_path)) as raw, raw:
            raw.execute(
                "INSERT INTO events (at, kind, device_id, serials) VALUES (?, 'issued', ?, ?)",
                ("2026-01-01T00:00:00.000000Z", device, f'["{cert.serial:x}"]'),
            )

    start = reg.last_event_seq()
    enroll_old_style("rv-a")
    reg.suspend_device(DeviceId("rv-a"), now=NOW, actor="op")
    for i in range(5):
        enroll_old_style(f"rv-filler-{i}")
    enroll_old_style("rv-b")
    reg.revoke_device(DeviceId("rv-b"), reason="keyCompromise", now=NOW, actor="op")
    for i in range(3):
        enroll_old_style(f"rv-late-{i}")
    assert [e.kind for e in reg.events_since(start)].count(EventKind.ISSUED) == 10
    events, nxt = reg.revocation_events_since(start)
    assert [(e.kind, e.device_id.value) for e in events] == [
        (EventKind.SUSPENDED, "rv-a"),
        (EventKind.REVOKED, "rv-b"),
    ]
    # The next poll starts after the trailing issuances too, and finds nothing new.
    assert nxt == reg.last_event_seq() > events[-1].seq
    assert reg.revocation_events_since(nxt) == ([], nxt)
    # Paging: a full page ends at its last event, so nothing is skipped.
    first, mid = reg.revocation_events_since(start, limit=1)
    assert [e.kind for e in first] == [EventKind.SUSPENDED] and mid == first[0].seq
    rest, end = reg.revocation_events_since(mid, limit=1)
    assert [e.kind for e in rest] == [EventKind.REVOKED] and end == rest[0].seq
    # Served by the partial index, which an issuance never touches.
    with sqlite3.connect(db_path) as raw:
        plan = " ".join(
            str(r[3])
            for r in raw.execute(
                "EXPLAIN QUERY PLAN SELECT seq FROM events "
                "WHERE kind <> 'issued' AND seq > 1 AND seq <= 9 ORDER BY seq LIMIT 5"
            )
        )
    assert "events_changes" in plan, plan


def test_v3_registry_migrates_to_certificates_without_a_fingerprint_index(
    db_path: Path, ca: MemoryCa
) -> None:
    """Schema 4 rebuilds the certificates table without UNIQUE(fingerprint): every row and
    column survives, the other indexes are back, and the serial is still the key."""
    with Registry.open(db_path) as reg:
        first = enroll(reg, ca, "old-a")
        second = enroll(reg, ca, "old-b", now=NOW + timedelta(hours=1))
        reg.revoke_device(DeviceId("old-a"), reason="keyCompromise", now=NOW, actor="op")
    with sqlite3.connect(db_path) as raw:
        before = raw.execute("SELECT * FROM certificates ORDER BY rowid").fetchall()
        # Back to schema 3: the table as schema 1 made it, the version rows cut back.
        raw.execute("ALTER TABLE certificates RENAME TO certificates_now")
        raw.execute(next(s for s in schema.MIGRATIONS[0].statements if "TABLE certificates" in s))
        raw.execute(
            "INSERT INTO certificates SELECT serial, device_id, fingerprint_sha256, not_before, "
            "not_after, issued_at, status, revoked_at, revocation_reason, pem "
            "FROM certificates_now"
        )
        raw.execute("DROP TABLE certificates_now")
        raw.execute("CREATE INDEX certificates_device ON certificates(device_id)")
        raw.execute(schema.MIGRATIONS[1].statements[-1])  # certificates_revoked
        raw.execute("DROP TABLE operators")  # schema 6's, which replaced admin_tokens
        raw.execute(next(s for s in schema.MIGRATIONS[0].statements if "admin_tokens" in s))
        raw.execute("ALTER TABLE batches DROP COLUMN manufacturer")  # schema 7's
        raw.execute("DROP TABLE console_sessions")  # schema 8's
        raw.execute("DROP TABLE ca_states")  # schema 10's
        raw.execute("DELETE FROM schema_version WHERE version > 3")
        unique = [r[0] for r in raw.execute("PRAGMA index_list(certificates)") if r[2]]
        assert len(unique) == 2  # serial and fingerprint: a schema 3 table

    with Registry.open(db_path) as reg:
        assert [c.serial for c in reg.certificates_of(DeviceId("old-a"))] == [first.serial]
        assert [c.serial for c in reg.certificates_of(DeviceId("old-b"))] == [second.serial]
        assert [e.serial for e in reg.revoked_entries(NOW)] == [first.serial]
        with pytest.raises(DuplicateSerial):
            reg.record_issuance(
                second, consume_token_hash=None, supersedes_serial=None, now=NOW, actor="est"
            )
    with sqlite3.connect(db_path) as raw:
        after = raw.execute("SELECT * FROM certificates ORDER BY rowid").fetchall()
        # Every column but schema 9's issuer_key_id, which the trip back to schema 3 dropped.
        assert [r[:-1] for r in after] == [r[:-1] for r in before]
        assert [r[-1] for r in after] == [None, None]
        indexes = {r[1]: r[2] for r in raw.execute("PRAGMA index_list(certificates)")}
        assert {"certificates_device", "certificates_revoked"} <= set(indexes)
        assert sum(indexes.values()) == 1  # one unique index: the serial's
        latest = raw.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        assert latest == schema.LATEST_VERSION
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []


def test_operator_authentication_compares_every_credential() -> None:
    from enroll_server.enrollment.operators import authenticate, may
    from enroll_server.registry import Operator, OperatorCredential

    def cred(name: str, role: OperatorRole, secret: str) -> OperatorCredential:
        return OperatorCredential(Operator(name, role, NOW, None), token_hash(secret))

    creds = [cred("a", OperatorRole.ADMIN, "sa"), cred("v", OperatorRole.VIEWER, "sv")]
    seen: list[str] = []

    def watched() -> Iterator[OperatorCredential]:
        for c in creds:
            seen.append(c.operator.name)
            yield c

    found = authenticate(watched(), "sa")
    assert found is not None and found.name == "a"
    assert seen == ["a", "v"]  # no early exit after the match
    assert authenticate(creds, "nope") is None and authenticate([], "sa") is None
    viewer = creds[1].operator
    assert may(viewer, "GET") and may(viewer, "head") and not may(viewer, "POST")
    assert may(creds[0].operator, "DELETE")
