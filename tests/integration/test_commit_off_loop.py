"""`fleetpki serve` on an SQLite registry commits its enrollments in a worker thread, on a
registry connection of its own (enrollment/commit_queue, wiring/server): every commit syncs
the WAL (PRAGMA synchronous = FULL, 3-4 ms a group on a VM's disk), and on the event loop that
wait held every handshake, OCSP answer and health check (BENCHMARKS.md, "Group commit off the
loop"). Here a commit is held inside its transaction, write lock taken, as a slow sync would
hold it: the server answers meanwhile, and the device hears nothing until it is recorded.
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from fleetpki.identity import DeviceId
from tests.est_client import request
from tests.integration.test_est import enroll
from tests.live_server import LiveServer
from tests.unit.test_commit_queue import stall_transactions


def test_the_server_answers_while_an_enrollment_commit_is_held(live_server: LiveServer) -> None:
    writer = live_server.handle.commit_writer
    assert writer is not None, "the SQLite group commit runs on the event loop"
    raw = writer._raw
    assert isinstance(raw, sqlite3.Connection) and writer.path == live_server.registry.path
    token = live_server.mint_device("slow-commit")
    with writer._lock:  # the connection is idle: no commit is under way
        stalled, release = stall_transactions(raw)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(enroll, live_server, "slow-commit", token)
            assert stalled.wait(15), "the enrollment's commit never started"
            for _ in range(3):
                started = time.monotonic()
                health = request(live_server.http_url + "/healthz", None, timeout=5)
                assert health.status == 200
                assert time.monotonic() - started < 2.0
            assert not pending.done()  # not a byte of the reply before the commit
            assert live_server.registry.certificates_of(DeviceId("slow-commit")) == []
            release.set()
            reply = pending.result(15)
    finally:
        release.set()
        with writer._lock:
            raw.set_progress_handler(None, 0)
    assert reply.status == 200, reply.text
    assert len(live_server.registry.certificates_of(DeviceId("slow-commit"))) == 1
