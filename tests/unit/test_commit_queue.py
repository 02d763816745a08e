"""CommitQueue (group commit on the event loop) and EnrollmentService.issue/settle over it.

A real registry file throughout; record_issuances is only wrapped (a spy) to see how the
queue groups issuances into transactions, or to make one transaction fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from enroll_server.enrollment.commit_queue import CommitFailed, CommitQueue, Done
from enroll_server.enrollment.service import (
    BAD_CREDENTIALS,
    Enrollment,
    EnrollmentService,
    PendingEnrollment,
)
from enroll_server.errors import (
    AuthenticationFailed,
    DeviceInactive,
    DeviceRevoked,
    DeviceSuspended,
)
from enroll_server.pki import template as template_module
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.profile import DeviceProfile
from enroll_server.pki.template import BuilderCertificates, CertificateTemplate, TemplateMismatch
from enroll_server.registry import (
    CertStatus,
    DeviceNotActive,
    DeviceState,
    DuplicateSerial,
    Issuance,
    Registry,
    RegistryBusy,
    RegistryError,
    TokenRejected,
)
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa, csr_der, make_csr
from tests.unit.test_registry import NOW, TTL, issued, new_devices, token_hash


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry.open(tmp_path / "r.db")
    yield registry
    registry.close()


def provision(reg: Registry, count: int) -> list[DeviceId]:
    """Devices q-000000...; the enrollment token of X is 'token-X'."""
    reg.create_batch("q", new_devices("q", count), kind="token", token_ttl=TTL, now=NOW, actor="op")
    return [DeviceId(f"q-{i:06d}") for i in range(count)]


def item(ca: MemoryCa, device: DeviceId, token: str | None = None) -> Issuance:
    token = token or token_hash(f"token-{device.value}")
    return Issuance(issued(ca, device.value), token, None, NOW, "est")


class Spy:
    """Wraps registry.record_issuances: when and how big each transaction was."""

    def __init__(self, reg: Registry, failures: int = 0) -> None:
        self.real = reg.record_issuances
        self.calls: list[tuple[float, int]] = []
        self.failures = failures
        self.raised: list[BaseException] = []
        self.waits: list[bool] = []

    def __call__(
        self, batch: Sequence[Issuance], *, wait: bool = True
    ) -> list[RegistryError | None]:
        self.calls.append((time.monotonic(), len(batch)))
        self.waits.append(wait)
        if self.failures:
            self.failures -= 1
            exc = sqlite3.OperationalError("disk I/O error")
            self.raised.append(exc)
            raise exc
        return self.real(batch, wait=wait)

    @property
    def sizes(self) -> list[int]:
        return [n for _, n in self.calls]


@pytest.fixture
def spy(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy(reg)
    monkeypatch.setattr(reg, "record_issuances", spy)
    return spy


def recorded(reg: Registry, it: Issuance) -> bool:
    record = reg.get_certificate(it.cert.serial)
    return record is not None and record.status is CertStatus.ACTIVE


# ---------------------------------------------------------------- grouping


async def test_records_of_one_loop_iteration_share_one_transaction(
    reg: Registry, ca: MemoryCa, spy: Spy
) -> None:
    items = [item(ca, d) for d in provision(reg, 6)]
    queue = CommitQueue(reg)
    begins: list[str] = []
    reg._conn.set_trace_callback(
        lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None
    )
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(queue.record(i) for i in items)), timeout=5
        )
    finally:
        reg._conn.set_trace_callback(None)
    assert outcomes == [None] * 6
    assert spy.sizes == [6]
    assert len(begins) == 1  # one SQLite transaction for all six
    assert (queue.batches.n, queue.batches.total) == (1, 6.0)
    assert all(recorded(reg, i) for i in items)
    assert "fleetpki_registry_commit_batch_count 1" in queue.batches.render()


async def test_idle_queue_flushes_the_first_submit_at_once(
    reg: Registry, ca: MemoryCa, spy: Spy
) -> None:
    first, second = (item(ca, d) for d in provision(reg, 2))
    queue = CommitQueue(reg, window=10.0)
    heard: list[BaseException | None] = []
    queue.submit(first, heard.append)
    assert heard == [] and spy.sizes == []  # not inside submit: on the loop, call_soon
    started = time.monotonic()
    for _ in range(100):
        await asyncio.sleep(0)
        if heard:
            break
    assert heard == [None]
    assert time.monotonic() - started < 0.5  # the 10 s window did not delay it
    assert recorded(reg, first)
    # Right after a flush the window is in force: the next one waits (up to 10 s here).
    queue.submit(second, heard.append)
    await asyncio.sleep(0.1)
    assert heard == [None] and spy.sizes == [1]
    queue.flush()
    assert heard == [None, None] and spy.sizes == [1, 1]


async def test_record_on_an_idle_queue_takes_no_window(
    reg: Registry, ca: MemoryCa, spy: Spy
) -> None:
    (only,) = (item(ca, d) for d in provision(reg, 1))
    queue = CommitQueue(reg, window=10.0)
    started = time.monotonic()
    assert await asyncio.wait_for(queue.record(only), timeout=2) is None
    assert time.monotonic() - started < 0.5
    assert recorded(reg, only)


async def test_busy_queue_waits_for_the_window_and_groups(
    reg: Registry, ca: MemoryCa, spy: Spy
) -> None:
    first, *rest = (item(ca, d) for d in provision(reg, 4))
    # Small, yet roomy enough that a loaded machine still submits all three within it.
    queue = CommitQueue(reg, window=0.15)
    assert await queue.record(first) is None  # idle: at once
    waiting = [asyncio.ensure_future(queue.record(rest[0]))]
    for it in rest[1:]:
        await asyncio.sleep(0.01)
        waiting.append(asyncio.ensure_future(queue.record(it)))
    assert not any(w.done() for w in waiting)
    assert await asyncio.wait_for(asyncio.gather(*waiting), timeout=5) == [None] * 3
    assert spy.sizes == [1, 3]  # everything submitted during the window, in one transaction
    gap = spy.calls[1][0] - spy.calls[0][0]
    assert 0.12 <= gap < 2.0  # one window after the previous flush, not at once
    assert (queue.batches.n, queue.batches.total) == (2, 4.0)
    assert all(recorded(reg, i) for i in rest)


async def test_after_a_quiet_spell_the_flush_is_immediate_again(
    reg: Registry, ca: MemoryCa, spy: Spy
) -> None:
    first, second = (item(ca, d) for d in provision(reg, 2))
    queue = CommitQueue(reg, window=0.2)
    assert await queue.record(first) is None
    await asyncio.sleep(0.25)  # longer than the window: quiet
    started = time.monotonic()
    assert await queue.record(second) is None
    assert time.monotonic() - started < 0.15
    assert spy.sizes == [1, 1]


async def test_max_batch_flushes_at_once_inside_the_window(
    reg: Registry, ca: MemoryCa, spy: Spy
) -> None:
    first, *rest = (item(ca, d) for d in provision(reg, 4))
    queue = CommitQueue(reg, window=10.0, max_batch=3)
    assert await queue.record(first) is None
    heard: list[BaseException | None] = []
    queue.submit(rest[0], heard.append)
    queue.submit(rest[1], heard.append)
    await asyncio.sleep(0.05)
    assert heard == [] and spy.sizes == [1]  # held for the 10 s window
    queue.submit(rest[2], heard.append)  # the third fills the batch: flushed in submit
    assert heard == [None, None, None]
    assert spy.sizes == [1, 3]
    assert all(recorded(reg, i) for i in rest)


async def test_max_batch_on_an_idle_queue_leaves_nothing_for_the_scheduled_flush(
    reg: Registry, ca: MemoryCa, spy: Spy
) -> None:
    items = [item(ca, d) for d in provision(reg, 3)]
    queue = CommitQueue(reg, window=10.0, max_batch=3)
    heard: list[BaseException | None] = []
    for it in items:
        queue.submit(it, heard.append)
    assert heard == [None] * 3 and spy.sizes == [3]
    for _ in range(5):
        await asyncio.sleep(0)  # the call_soon flush of the first submit runs: empty
    assert spy.sizes == [3]
    assert (queue.batches.n, queue.batches.total) == (1, 3.0)


# ---------------------------------------------------------------- outcomes


async def test_refused_item_hears_its_error_the_others_none(
    reg: Registry, ca: MemoryCa, spy: Spy
) -> None:
    devices = provision(reg, 3)
    items = [item(ca, devices[0]), item(ca, devices[1], token_hash("bogus")), item(ca, devices[2])]
    queue = CommitQueue(reg)
    outcomes = await asyncio.wait_for(asyncio.gather(*(queue.record(i) for i in items)), timeout=5)
    assert outcomes[0] is None and outcomes[2] is None
    refused = outcomes[1]
    assert isinstance(refused, TokenRejected)
    assert (refused.reason, refused.device_id) == ("unknown", devices[1])
    assert spy.sizes == [3]
    assert recorded(reg, items[0]) and recorded(reg, items[2])
    assert reg.certificates_of(devices[1]) == []


async def test_failed_transaction_fails_every_waiter_and_the_queue_goes_on(
    reg: Registry, ca: MemoryCa, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    devices = provision(reg, 3)
    items = [item(ca, d) for d in devices]
    spy = Spy(reg, failures=1)
    monkeypatch.setattr(reg, "record_issuances", spy)
    queue = CommitQueue(reg)
    with caplog.at_level(logging.ERROR, logger="fleetpki.commit"):
        async with asyncio.timeout(5):
            results = await asyncio.gather(
                *(queue.record(i) for i in items), return_exceptions=True
            )
    # raised by record() to each waiter: one CommitFailed whose cause is the database error
    assert all(isinstance(r, CommitFailed) for r in results)
    assert all(r is results[0] and r.__cause__ is spy.raised[0] for r in results)
    assert queue.batches.n == 0  # the histogram counts recorded batches only
    assert "registry commit of 3 issuances failed" in caplog.text
    assert all(reg.certificates_of(d) == [] for d in devices)
    # The next batch is committed as usual: the same issuances, nothing left stuck.
    again = await asyncio.wait_for(asyncio.gather(*(queue.record(i) for i in items)), timeout=5)
    assert again == [None] * 3
    assert spy.sizes == [3, 3]
    assert all(recorded(reg, i) for i in items)


async def test_a_raising_callback_does_not_stop_the_others(
    reg: Registry, ca: MemoryCa, spy: Spy, caplog: pytest.LogCaptureFixture
) -> None:
    items = [item(ca, d) for d in provision(reg, 4)]
    queue = CommitQueue(reg)
    heard: list[tuple[int, BaseException | None]] = []

    def done(i: int) -> Done:
        def callback(outcome: BaseException | None) -> None:
            heard.append((i, outcome))
            if i in (0, 2):
                raise RuntimeError(f"callback {i} broke")

        return callback

    with caplog.at_level(logging.ERROR, logger="fleetpki.commit"):
        for i, it in enumerate(items[:3]):
            queue.submit(it, done(i))
        queue.flush()
    assert heard == [(0, None), (1, None), (2, None)]
    assert caplog.text.count("enrollment completion callback failed") == 2
    assert all(recorded(reg, i) for i in items[:3])
    assert await asyncio.wait_for(queue.record(items[3]), timeout=5) is None


# ---------------------------------------------------------------- the service over the queue


@pytest.fixture
def service(reg: Registry, ca: MemoryCa) -> EnrollmentService:
    return EnrollmentService(reg, ca.issuing, DeviceProfile())


def pending_for(service: EnrollmentService, device: DeviceId) -> PendingEnrollment:
    """authorize_token + issue for a fresh key: signed, not yet recorded."""
    auth = service.authorize_token(device.value, f"token-{device.value}", NOW)
    key = generate_key(KeyType.EC_P256)
    outcome = service.issue(csr_der(make_csr(key, device.value)), auth, NOW)
    assert isinstance(outcome, PendingEnrollment)
    assert outcome.enrollment.certificate.public_key() == key.public_key()
    return outcome


def test_service_issues_from_the_template_or_else_the_builder(
    reg: Registry, ca: MemoryCa, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both ways of signing give the certificate of the profile; the fallback says so once."""
    assert isinstance(
        EnrollmentService(reg, ca.issuing, DeviceProfile())._certificates, CertificateTemplate
    )

    def mismatch(issuer: object) -> None:
        raise TemplateMismatch("probe TBS differs (1 vs 2 octets)")

    monkeypatch.setattr(template_module, "CertificateTemplate", mismatch)
    with caplog.at_level(logging.WARNING, logger="fleetpki.service"):
        fallback = EnrollmentService(reg, ca.issuing, DeviceProfile())
    assert isinstance(fallback._certificates, BuilderCertificates)
    assert "probe TBS differs" in caplog.text and "builder instead" in caplog.text
    (device,) = provision(reg, 1)
    pending = pending_for(fallback, device)
    cert = pending.enrollment.certificate
    cert.verify_directly_issued_by(ca.issuing.cert)
    assert pending.issuance.cert.serial == cert.serial_number
    assert cert.subject.rfc4514_string() == f"CN={device.value}"


async def test_issue_then_settle_returns_what_was_recorded(
    reg: Registry, ca: MemoryCa, service: EnrollmentService, spy: Spy
) -> None:
    devices = provision(reg, 3)
    pendings = [pending_for(service, d) for d in devices]
    for d in devices:  # signed, but nothing recorded before the commit
        assert reg.certificates_of(d) == []
    queue = CommitQueue(reg)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(queue.record(p.issuance) for p in pendings)), timeout=5
    )
    assert spy.sizes == [3]
    for device, pending, outcome in zip(devices, pendings, outcomes, strict=True):
        enrollment = service.settle(pending, outcome)
        assert isinstance(enrollment, Enrollment)
        cert = enrollment.certificate
        der = cert.public_bytes(serialization.Encoding.DER)
        (record,) = reg.certificates_of(device)
        assert record.serial == cert.serial_number
        assert record.status is CertStatus.ACTIVE
        assert record.fingerprint_sha256 == hashlib.sha256(der).hexdigest()
        assert record.pem == cert.public_bytes(serialization.Encoding.PEM).decode()
        assert (record.not_before, record.not_after) == (
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
        assert enrollment.chain_der == (
            der,
            ca.issuing.cert.public_bytes(serialization.Encoding.DER),
        )
        assert enrollment.chain[1] == ca.issuing.cert
        state = reg.get_device(device)
        assert state is not None and state.state is DeviceState.ACTIVE
        with pytest.raises(TokenRejected, match="used"):
            reg.check_token(device, token_hash(f"token-{device.value}"), NOW)


async def test_settle_lost_token_race_is_authentication_failed(
    reg: Registry, service: EnrollmentService
) -> None:
    (device,) = provision(reg, 1)
    winner, loser = pending_for(service, device), pending_for(service, device)
    queue = CommitQueue(reg)
    won, lost = await asyncio.wait_for(
        asyncio.gather(queue.record(winner.issuance), queue.record(loser.issuance)), timeout=5
    )
    assert won is None and isinstance(lost, TokenRejected)
    enrollment = service.settle(winner, won)
    with pytest.raises(AuthenticationFailed) as info:
        service.settle(loser, lost)
    assert info.value.reason == "enrollment token used"
    assert info.value.__cause__ is lost
    assert [c.serial for c in reg.certificates_of(device)] == [enrollment.certificate.serial_number]


@pytest.mark.parametrize("state", ["suspended", "revoked"])
async def test_settle_device_gone_inactive_is_device_revoked(
    reg: Registry, service: EnrollmentService, state: str
) -> None:
    (device,) = provision(reg, 1)
    pending = pending_for(service, device)
    # Suspended or revoked between authorization and commit.
    if state == "suspended":
        reg.suspend_device(device, now=NOW, actor="op")
    else:
        reg.revoke_device(device, reason="keyCompromise", now=NOW, actor="op")
    refused = await asyncio.wait_for(CommitQueue(reg).record(pending.issuance), timeout=5)
    assert isinstance(refused, DeviceNotActive)
    with pytest.raises(DeviceInactive) as info:
        service.settle(pending, refused)
    assert (info.value.device_id, info.value.state) == (device.value, state)
    # The class says which, so the wire code does (device-suspended is reversible).
    assert isinstance(info.value, DeviceSuspended if state == "suspended" else DeviceRevoked)
    assert info.value.__cause__ is refused
    assert reg.certificates_of(device) == []


def test_settle_passes_other_registry_errors_through(
    reg: Registry, service: EnrollmentService
) -> None:
    (device,) = provision(reg, 1)
    pending = pending_for(service, device)
    clash = DuplicateSerial(pending.issuance.cert.serial)
    with pytest.raises(DuplicateSerial) as info:
        service.settle(pending, clash)
    assert info.value is clash


def test_enroll_records_before_returning(reg: Registry, service: EnrollmentService) -> None:
    devices = provision(reg, 2)
    auth = service.authorize_token(devices[0].value, f"token-{devices[0].value}", NOW)
    key = generate_key(KeyType.EC_P256)
    enrollment = service.enroll(csr_der(make_csr(key, devices[0].value)), auth, NOW)
    (record,) = reg.certificates_of(devices[0])
    assert record.serial == enrollment.certificate.serial_number
    # A second enroll with the token spent meanwhile (the race lost) is refused by settle.
    stale = service.authorize_token(devices[1].value, f"token-{devices[1].value}", NOW)
    service.enroll(csr_der(make_csr(generate_key(KeyType.EC_P256), devices[1].value)), stale, NOW)
    with pytest.raises(AuthenticationFailed, match="enrollment token used"):
        service.enroll(
            csr_der(make_csr(generate_key(KeyType.EC_P256), devices[1].value)),
            stale,
            NOW,
        )
    assert len(reg.certificates_of(devices[1])) == 1


def test_submit_outside_the_loop_raises_and_leaves_nothing_queued(
    reg: Registry, ca: MemoryCa
) -> None:
    queue = CommitQueue(reg)
    (device,) = provision(reg, 1)
    with pytest.raises(RuntimeError):
        queue.submit(item(ca, device), lambda outcome: None)
    # Nothing stuck: the next submit from inside a loop is flushed as usual.
    assert asyncio.run(queue.record(item(ca, device))) is None
    assert len(reg.certificates_of(device)) == 1


async def test_settle_token_gone_meanwhile_says_no_more_than_authorization(
    reg: Registry, service: EnrollmentService
) -> None:
    """A token replaced between authorization and commit is refused in the same words as an
    unknown device or a wrong token (no enumeration oracle)."""
    (device,) = provision(reg, 1)
    pending = pending_for(service, device)
    refused = TokenRejected(device, "unknown")
    with pytest.raises(AuthenticationFailed) as info:
        service.settle(pending, refused)
    assert info.value.reason == BAD_CREDENTIALS


# ---------------------------------------------------------------- another writer holds the lock


@pytest.fixture
def holder(reg: Registry) -> Iterator[sqlite3.Connection]:
    """Another connection (as the CLI would be) that takes the registry's write lock."""
    conn = sqlite3.connect(reg.path, isolation_level=None)
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


async def test_a_held_write_lock_never_blocks_the_loop_and_the_batch_waits_for_it(
    reg: Registry, ca: MemoryCa, spy: Spy, holder: sqlite3.Connection
) -> None:
    first, second, late = (item(ca, d) for d in provision(reg, 3))
    queue = CommitQueue(reg)
    holder.execute("BEGIN IMMEDIATE")
    waiting = [
        asyncio.ensure_future(queue.record(first)),
        asyncio.ensure_future(queue.record(second)),
    ]
    started = time.monotonic()
    await asyncio.sleep(0.2)
    # SQLite's busy handler would have held the loop for the registry's 5 s busy timeout.
    assert time.monotonic() - started < 1.0
    assert not any(w.done() for w in waiting)
    assert len(spy.calls) >= 2 and not any(spy.waits)  # tried, refused at once, tried again
    waiting.append(asyncio.ensure_future(queue.record(late)))  # joins the waiting batch
    await asyncio.sleep(0.05)
    holder.execute("COMMIT")
    assert await asyncio.wait_for(asyncio.gather(*waiting), timeout=5) == [None] * 3
    assert spy.sizes[-1] == 3 and queue.batches.n == 1  # one transaction, once the lock was free
    assert all(recorded(reg, i) for i in (first, second, late))
    # The non-waiting attempts left the connection's busy timeout as it was.
    assert reg._conn.execute("PRAGMA busy_timeout").fetchone() == (5000,)


async def test_a_lock_held_past_the_deadline_fails_the_batch_and_the_queue_goes_on(
    reg: Registry,
    ca: MemoryCa,
    spy: Spy,
    holder: sqlite3.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    devices = provision(reg, 2)
    items = [item(ca, d) for d in devices]
    queue = CommitQueue(reg, busy_deadline=0.3)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="fleetpki.commit"):
        results = await asyncio.wait_for(
            asyncio.gather(*(queue.record(i) for i in items), return_exceptions=True), timeout=5
        )
    assert 0.3 <= time.monotonic() - started < 3.0
    assert all(isinstance(r, CommitFailed) for r in results)
    cause = results[0].__cause__
    assert isinstance(cause, RegistryBusy) and cause.waited_ms == 300
    assert "held by another connection" in caplog.text
    assert "stayed locked by another writer for 300 ms" in caplog.text
    assert all(reg.certificates_of(d) == [] for d in devices)
    holder.execute("ROLLBACK")
    again = await asyncio.wait_for(asyncio.gather(*(queue.record(i) for i in items)), timeout=5)
    assert again == [None] * 2
    assert all(recorded(reg, i) for i in items)


async def test_a_short_wait_for_the_lock_is_routine_and_not_logged(
    reg: Registry,
    ca: MemoryCa,
    holder: sqlite3.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The WAL checkpointer (registry.checkpointer) holds the write lock for some ms every few
    # seconds: the batch waits it out without an operator-facing warning.
    items = [item(ca, d) for d in provision(reg, 2)]
    queue = CommitQueue(reg)
    holder.execute("BEGIN IMMEDIATE")
    with caplog.at_level(logging.DEBUG, logger="fleetpki.commit"):
        waiting = asyncio.gather(*(queue.record(i) for i in items))
        await asyncio.sleep(0.05)
        holder.execute("COMMIT")
        assert await asyncio.wait_for(waiting, timeout=5) == [None] * 2
    assert "held by another connection" not in caplog.text
    assert "free again" not in caplog.text
    assert all(recorded(reg, i) for i in items)


# ---------------------------------------------------------------- a writer of SQLite's own


def stall_transactions(conn: sqlite3.Connection) -> tuple[threading.Event, threading.Event]:
    """Make `conn` stop inside its next write transaction, holding the write lock, until
    released (as a slow sync would): SQLite's progress handler, on the thread running it."""
    stalled, release = threading.Event(), threading.Event()

    def progress() -> int:
        if conn.in_transaction and not stalled.is_set():
            stalled.set()
            release.wait(10)
        return 0

    conn.set_progress_handler(progress, 20)
    return stalled, release


async def test_a_sqlite_writer_commits_off_the_loop_and_the_loop_connection_never_waits(
    reg: Registry, ca: MemoryCa, tmp_path: Path, holder: sqlite3.Connection
) -> None:
    """The server's SQLite commits run in a worker thread on a connection of their own: while
    one holds the write lock (slowed here), the loop ticks, its connection reads, and its own
    non-waiting writes are refused at once instead of waiting; a lock held by another process
    is waited for by retrying, never in SQLite's busy handler."""
    first, second, late = (item(ca, d) for d in provision(reg, 3))
    with Registry.open(tmp_path / "r.db") as writer:
        raw = writer._raw
        assert isinstance(raw, sqlite3.Connection)
        stalled, release = stall_transactions(raw)
        queue = CommitQueue(reg, writer=writer)
        try:
            waiting = [asyncio.ensure_future(queue.record(first))]
            started = time.monotonic()
            while not stalled.is_set() and time.monotonic() - started < 5:
                await asyncio.sleep(0.005)
            assert stalled.is_set()  # in its thread, holding the write lock
            before = time.monotonic()
            assert reg.get_device(DeviceId("q-000000")) is not None
            assert not reg.touch_console_session("x" * 64, NOW)  # refused, not waited for
            assert time.monotonic() - before < 0.5
            waiting.append(asyncio.ensure_future(queue.record(second)))
            await asyncio.sleep(0.05)
            assert not any(w.done() for w in waiting)  # no reply before the commit
        finally:
            release.set()
        assert await asyncio.wait_for(asyncio.gather(*waiting), timeout=5) == [None] * 2
        # Another process holds the lock: the writer is refused at once and retried.
        holder.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(queue.record(late))
        await asyncio.sleep(0.2)
        assert not pending.done() and queue._busy_since is not None
        holder.execute("COMMIT")
        assert await asyncio.wait_for(pending, timeout=5) is None
        assert raw.execute("PRAGMA busy_timeout").fetchone() == (5000,)
    assert all(recorded(reg, i) for i in (first, second, late))


# ---------------------------------------------------------------- a shared registry (PostgreSQL)


async def test_a_writer_commits_off_the_loop_and_groups_what_queued_meanwhile(
    pg_url: str, ca: MemoryCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL each transaction runs in a worker thread: a slow commit (here 0.4 s,
    made so by a trigger) holds no one on the loop, and what arrives meanwhile is one group."""
    import psycopg

    with Registry.open(pg_url, create=True) as reg, Registry.open(pg_url) as writer:
        first, second, third = (item(ca, d) for d in provision(reg, 3))
        with psycopg.connect(pg_url, autocommit=True) as raw:
            raw.execute(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM pg_sleep(0.4); RETURN NEW; END $$"
            )
            raw.execute(
                "CREATE TRIGGER slow_issue AFTER INSERT ON certificates "
                "FOR EACH STATEMENT EXECUTE FUNCTION slow()"
            )
        spy = Spy(writer)
        monkeypatch.setattr(writer, "record_issuances", spy)
        queue = CommitQueue(reg, writer=writer)
        waiting = [asyncio.ensure_future(queue.record(first))]
        await asyncio.sleep(0.05)  # the first transaction is under way in its thread
        waiting += [asyncio.ensure_future(queue.record(i)) for i in (second, third)]
        ticks, started = 0, time.monotonic()
        while not all(w.done() for w in waiting) and time.monotonic() - started < 5:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            # The loop never waits for the database: no tick takes the commit's 0.4 s.
            assert time.monotonic() - before < 0.2
            ticks += 1
        assert await asyncio.gather(*waiting) == [None] * 3
        assert spy.sizes == [1, 2] and ticks > 40
        assert all(recorded(reg, i) for i in (first, second, third))
