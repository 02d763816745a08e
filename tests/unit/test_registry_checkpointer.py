"""WAL checkpoints off the event loop (registry.checkpointer), on a real SQLite file."""

from __future__ import annotations

import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enroll_server.registry import Registry
from enroll_server.registry.checkpointer import LOOP_AUTOCHECKPOINT_PAGES, Checkpointer
from enroll_server.registry.store import WAL_AUTOCHECKPOINT_PAGES
from fleetpki.identity import DeviceId

NOW = datetime(2026, 11, 27, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def loop_registry(db: Path) -> Iterator[Registry]:
    # As the server opens it: no automatic checkpoint this side of the backstop.
    registry = Registry.open(db, wal_autocheckpoint=LOOP_AUTOCHECKPOINT_PAGES)
    yield registry
    registry.close()


def wal_pages(db: Path) -> tuple[int, int]:
    """(pages in the WAL, pages of it already in the database), read from the WAL index
    without copying anything (https://www.sqlite.org/walformat.html: mxFrame at byte 16 of
    the header, nBackfill at byte 96, native byte order)."""
    shm = Path(f"{db}-shm").read_bytes()
    return struct.unpack_from("=I", shm, 16)[0], struct.unpack_from("=I", shm, 96)[0]


def add_devices(registry: Registry, prefix: str, n: int) -> None:
    for i in range(n):
        registry.add_device(DeviceId(f"{prefix}-{i}"), batch_id=None, now=NOW, actor="test")


def test_the_loops_connection_does_not_checkpoint_below_its_backstop(
    db: Path, loop_registry: Registry
) -> None:
    assert loop_registry.wal_autocheckpoint == LOOP_AUTOCHECKPOINT_PAGES
    assert Checkpointer(db.with_name("absent.db")).wal_pages() == 0  # no WAL index: nothing
    with Registry.open(db) as other:  # any other connection: the usual threshold
        assert other.wal_autocheckpoint == WAL_AUTOCHECKPOINT_PAGES < LOOP_AUTOCHECKPOINT_PAGES
    add_devices(loop_registry, "d", 300)
    log_pages, done = wal_pages(db)
    assert log_pages > 300 and done == 0  # every commit's pages are still in the WAL only


def test_a_checkpoint_copies_the_wal_and_the_next_writer_starts_it_over(
    db: Path, loop_registry: Registry
) -> None:
    add_devices(loop_registry, "d", 300)
    checkpointer = Checkpointer(db)
    with pytest.raises(RuntimeError):
        checkpointer.checkpoint()  # not started
    checkpointer.start()
    try:
        log_pages, copied = checkpointer.checkpoint()
    finally:
        checkpointer.stop()
    assert log_pages > 300 and copied == log_pages
    loop_registry.add_device(DeviceId("after"), batch_id=None, now=NOW, actor="test")
    assert wal_pages(db)[0] < 20  # restarted: only the last commit's pages
    assert loop_registry.get_device(DeviceId("d-299")) is not None


def test_a_checkpoint_never_waits_for_a_writer(db: Path, loop_registry: Registry) -> None:
    add_devices(loop_registry, "d", 50)
    checkpointer = Checkpointer(db)
    checkpointer.start()
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        started = time.monotonic()
        log_pages, copied = checkpointer.checkpoint()
        assert time.monotonic() - started < 1.0
        # PASSIVE copied what was committed; RESTART gave up without blocking.
        assert copied == log_pages > 0
        other.execute("ROLLBACK")
    finally:
        other.close()
        checkpointer.stop()


def test_the_thread_keeps_the_wal_small_under_steady_commits(
    db: Path, loop_registry: Registry
) -> None:
    checkpointer = Checkpointer(db, pages=40, interval=0.01)
    checkpointer.start()
    try:
        for i in range(120):
            loop_registry.add_device(DeviceId(f"s-{i}"), batch_id=None, now=NOW, actor="test")
            time.sleep(0.005)
        assert checkpointer.running
    finally:
        checkpointer.stop()
        checkpointer.stop()  # idempotent
    assert not checkpointer.running and checkpointer.runs > 3
    # Without the thread the WAL would hold every commit's pages (> 120, see above); with it
    # the log was started over again and again.
    assert wal_pages(db)[0] < 60
    assert loop_registry.count_devices() == 120


def test_the_thread_waits_for_the_threshold_and_then_for_idle_time(
    db: Path, loop_registry: Registry
) -> None:
    add_devices(loop_registry, "d", 10)
    checkpointer = Checkpointer(db, pages=10_000, interval=0.01, idle=0.3)
    assert checkpointer.wal_pages() == wal_pages(db)[0] > 10  # the same header, read alike
    checkpointer.start()
    try:
        time.sleep(0.15)
        assert checkpointer.runs == 0  # far below the threshold, not idle long enough
        deadline = time.monotonic() + 5
        while checkpointer.runs == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        checkpointer.stop()
    assert checkpointer.runs >= 1  # a quiet WAL is copied back after `idle` seconds
    log_pages, copied = wal_pages(db)
    assert copied == log_pages


# Run in another process: whether this one may lock SQLite's DMS byte of the WAL index
# exclusively (os_unix.c: UNIX_SHM_DMS = (22 + 8) * 4 + 8 = 128), which it may only when no
# process holds the registry open (each holds a shared lock on that byte while it does).
DMS_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
except OSError:
    print("held")
else:
    print("free")
"""


def _dms(db: Path) -> str:
    probe = subprocess.run(
        [sys.executable, "-c", DMS_PROBE, f"{db}-shm"], capture_output=True, text=True, timeout=30
    )
    return probe.stdout.strip() or probe.stderr


def test_reading_the_wal_size_keeps_sqlites_locks_on_the_wal_index(
    db: Path, loop_registry: Registry
) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it
    (fcntl(2)), SQLite's included. The checkpointer used to open and close the -shm file to
    read the WAL's size, every 0.5 s: the server's shared lock went with it, the next process
    to open the registry (a CLI command, a restarted node, a check) believed itself alone,
    reset the WAL index and truncated it under the server's mapping, and `fleetpki serve`
    died of SIGBUS (found by tests/integration/test_kill_serve.py)."""
    add_devices(loop_registry, "lk", 3)
    assert _dms(db) == "held"
    checkpointer = Checkpointer(db)
    assert checkpointer.wal_pages() > 3
    assert _dms(db) == "held", "reading the WAL size dropped this process's locks"
