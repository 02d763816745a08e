"""Group commit: the issuances of one event-loop iteration go to the registry in one transaction.

Under load many enrollments finish signing in the same loop iteration (their connections were
ready together). Recording each in its own transaction pays a commit (WAL append and its
sync) per certificate; recording them together pays one, which is most of what the registry
costs per enrollment (BENCHMARKS.md, "Enrollment"). Nothing is returned to any client before
its issuance is committed: a callback fires only after the transaction holding it committed
or refused it, and a failed transaction fails every issuance in it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import time
from collections.abc import Callable
from functools import partial

from enroll_server.enrollment.metrics import Histogram
from enroll_server.errors import Unavailable
from enroll_server.registry import Issuance, Registry, RegistryBusy, RegistryError
from enroll_server.registry.connection import BUSY_TIMEOUT_MS
from enroll_server.registry.errors import RegistryUnavailable

log = logging.getLogger("fleetpki.commit")

# Called once with None (recorded), the RegistryError that refused this issuance, or a
# CommitFailed when the whole transaction failed (nothing of the batch was recorded).
Done = Callable[[BaseException | None], None]


class CommitFailed(Exception):
    """The transaction holding this issuance failed as a whole; its cause is chained.

    `busy`: the cause was the registry's write lock, held elsewhere past the busy deadline;
    the client may simply try again (registry_busy()), nothing of its request was used.
    """

    def __init__(self, cause: BaseException, size: int) -> None:
        super().__init__(f"registry commit of {size} issuances failed: {cause}")
        self.__cause__ = cause
        self.busy = isinstance(cause, RegistryBusy) or disk_full(cause)


def disk_full(exc: BaseException | None) -> bool:
    """The registry's disk is full: SQLite's SQLITE_FULL ("database or disk is full") or an
    OSError ENOSPC. Like a held lock, the transaction was rolled back as a whole (nothing of
    the request was used) and a retry succeeds once space is freed."""
    while exc is not None:
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == _FULL:
            return True
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__
    return False


# SQLITE_FULL (https://www.sqlite.org/rescode.html#full).
_FULL = 13


# Seconds a client is asked to wait (Retry-After) when the registry stayed locked.
BUSY_RETRY_AFTER = 5


def registry_busy(cause: BaseException | None = None) -> Unavailable:
    """What a client hears when its request met the registry locked past the deadline, or
    unreachable (PostgreSQL restarting: RegistryUnavailable): 503 with Retry-After."""
    if disk_full(cause):
        why = "the registry's disk is full (no space left on device)"
    elif isinstance(cause, RegistryUnavailable) or isinstance(
        getattr(cause, "__cause__", None), RegistryUnavailable
    ):
        why = "the registry is unavailable"
    else:
        why = "the registry is locked by another writer"
    return Unavailable(f"{why}; nothing was issued, try again", BUSY_RETRY_AFTER)


BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# Retry delays while another process holds the registry's write lock: short at first (a CLI
# command's transaction usually lasts milliseconds), at most 100 ms apart.
_BUSY_FIRST_RETRY = 0.002
_BUSY_MAX_RETRY = 0.1
# A wait for the write lock is logged (warning, then "free again") once it lasts this long
# (or half the busy deadline, if that is shorter); shorter waits are routine.
_BUSY_WARN_AFTER = 0.5


_Result = list[BaseException | None] | Exception


def _record(registry: Registry, batch: list[tuple[Issuance, Done]]) -> _Result:
    """One record_issuances of `batch`, never waiting for the write lock: its outcomes, or the
    exception that failed the whole transaction (returned, to cross a thread)."""
    try:
        outcomes: list[BaseException | None] = list(
            registry.record_issuances([item for item, _ in batch], wait=False)
        )
        if len(outcomes) != len(batch):
            raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} issuances")
    except Exception as exc:
        return exc
    return outcomes


class CommitQueue:
    """Collects issuances on the loop and records them with one `record_issuances` per batch.

    The first issuance after a quiet spell is flushed at once (`call_soon`: with whatever else
    the same loop iteration submitted), so an idle server adds no latency. While commits
    follow each other closely, the next flush waits until `window` seconds after the previous
    one, so a busy server commits in groups of everything signed meanwhile: a few ms of
    latency for a much cheaper commit per certificate.

    A transaction costs about 330 us of server CPU whatever it holds (BEGIN/COMMIT, a
    statement per table, the WAL pages every issuance appends to) and about 40 us per
    issuance (BENCHMARKS.md). At ~900 enrollments/s, 5 ms groups ~7 issuances (~90 us each),
    15 ms ~15 (~60 us each) without moving p50 or p99 (queueing for the CPU dominates them);
    50 ms gained little more and added ~15 ms to p50.

    The commit never waits for the registry's write lock on the loop: while another process
    holds it (`fleetpki batch create` writing 100,000 devices holds it for seconds), waiting
    in SQLite's busy handler would freeze every connection of the server, the TLS handshakes,
    OCSP and the broker's revocation drops with it. Instead the batch waits on the loop,
    retried every few ms, up to `busy_deadline` seconds (the registry's busy timeout); then
    each of its issuances fails with CommitFailed.

    With a `writer` (a second registry connection: what `fleetpki serve` gives it on either
    backend) the transaction runs in a worker thread, one at a time, and the loop serves on
    meanwhile; what is submitted meanwhile forms the next group, committed right after. A
    group's commit waits for its sync: on SQLite (`synchronous = FULL`) the WAL's fsync, 3-4 ms
    for 15 issuances on a VM's disk, which on the loop held every other connection that long;
    on PostgreSQL a few network round trips and the server's commit sync (about 3.5 ms for 16
    issuances against a loopback PostgreSQL, 2 ms of it waiting). The writer only tries the
    write lock (SQLite: BEGIN IMMEDIATE with no busy timeout; PostgreSQL:
    pg_try_advisory_xact_lock, registry.postgres); a held or unreachable one (a
    RegistryUnavailable is a RegistryBusy) is retried as above, from the loop. While the
    writer holds the lock, the loop's own connection still reads (WAL readers never wait for
    the writer) and its writes on the hot path do not wait either (`wait=False`: the broker's
    settle_certificate, a console session's touch). Without a writer (tests, tools) the
    transaction runs on the loop's thread, on `registry`.
    """

    def __init__(
        self,
        registry: Registry,
        window: float = 0.015,
        max_batch: int = 256,
        busy_deadline: float = BUSY_TIMEOUT_MS / 1000,
        writer: Registry | None = None,
    ) -> None:
        self.registry = registry
        # A connection of the commits' own, used from a worker thread.
        self.writer = writer
        self._in_flight = False
        self.window = window
        self.max_batch = max_batch
        self.busy_deadline = busy_deadline
        self._last_flush = -1.0
        self._pending: list[tuple[Issuance, Done]] = []
        self._scheduled = False
        # While the write lock is held elsewhere: since when, and the next retry's delay.
        self._busy_since: float | None = None
        self._busy_warned = False
        self._warn_after = min(_BUSY_WARN_AFTER, busy_deadline / 2)
        self._busy_delay = _BUSY_FIRST_RETRY
        self.batches = Histogram(
            "fleetpki_registry_commit_batch",
            "Issuances recorded per registry transaction (group commit).",
            BATCH_BUCKETS,
        )

    def submit(self, issuance: Issuance, done: Done) -> None:
        """Queue `issuance`; `done(outcome)` is called from the loop after the commit."""
        loop = asyncio.get_running_loop()  # raises outside the loop, before anything is queued
        self._pending.append((issuance, done))
        if len(self._pending) >= self.max_batch and self._busy_since is None:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            delay = self._last_flush + self.window - time.monotonic()
            if delay > 0:
                loop.call_later(delay, self._scheduled_flush)
            else:
                loop.call_soon(self._scheduled_flush)

    async def record(self, issuance: Issuance) -> RegistryError | None:
        """Await the commit of `issuance`: None, or the RegistryError that refused it.

        Raises CommitFailed if the whole transaction failed.
        """
        future: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        def done(outcome: BaseException | None) -> None:
            if not future.done():
                future.set_result(outcome)

        self.submit(issuance, done)
        outcome = await future
        if outcome is None or isinstance(outcome, RegistryError):
            return outcome
        raise outcome

    def _scheduled_flush(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Record everything queued now, in one transaction, and report each outcome.

        With a `writer`, the transaction runs in a worker thread and this returns at once;
        what is queued meanwhile goes in the next transaction, right after this one.
        """
        if self._in_flight:
            return  # the commit under way flushes what queued meanwhile when it is done
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._last_flush = time.monotonic()
        if self.writer is None:
            self._settle(batch, _record(self.registry, batch))
            return
        self._in_flight = True
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(None, _record, self.writer, batch)
        running.add_done_callback(partial(self._recorded, batch))

    def _recorded(
        self, batch: list[tuple[Issuance, Done]], running: asyncio.Future[_Result]
    ) -> None:
        """The worker thread's commit is done (on the loop): report it, flush what waits."""
        self._in_flight = False
        if running.cancelled():
            result: _Result = RuntimeError("the commit was cancelled (the loop is stopping)")
        else:
            result = running.result()
        self._settle(batch, result)
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _settle(self, batch: list[tuple[Issuance, Done]], result: _Result) -> None:
        """Report each issuance's outcome, or put the batch back while the lock is held."""
        outcomes: list[BaseException | None]
        if isinstance(result, Exception):  # every waiter must hear of it, not just one
            cause: Exception = result
            if isinstance(result, RegistryBusy):
                if self._wait_for_lock(batch):
                    return
                if not isinstance(result, RegistryUnavailable):
                    cause = RegistryBusy(result.path, round(self.busy_deadline * 1000))
            failed = CommitFailed(cause, len(batch))
            if disk_full(cause):
                log.warning("%s: the disk is full; answering 503 until space is freed", failed)
            else:
                log.error("%s", failed)
            outcomes = [failed] * len(batch)
        else:
            outcomes = result
            self.batches.observe(float(len(batch)))
        if self._busy_since is not None:
            waited = time.monotonic() - self._busy_since
            if self._busy_warned:
                log.info("registry write lock free again after %.2f s", waited)
            self._busy_since = None
            self._busy_delay = _BUSY_FIRST_RETRY
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            try:
                done(outcome)
            except Exception:
                log.exception("enrollment completion callback failed")

    def _wait_for_lock(self, batch: list[tuple[Issuance, Done]]) -> bool:
        """Put `batch` back and retry soon; False once the lock was waited for too long."""
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
            self._busy_warned = False
        elif now - self._busy_since >= self.busy_deadline:
            self._busy_since = None
            self._busy_delay = _BUSY_FIRST_RETRY
            return False
        elif not self._busy_warned and now - self._busy_since >= self._warn_after:
            # Not at once: the WAL checkpointer holds the lock for some ms every few seconds
            # (registry.checkpointer), which is routine and no operator's concern.
            self._busy_warned = True
            log.warning("registry write lock held by another connection; enrollments wait")
        self._pending[:0] = batch  # first in, first recorded
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._busy_delay, self._scheduled_flush)
        self._busy_delay = min(self._busy_delay * 2, _BUSY_MAX_RETRY)
        return True
