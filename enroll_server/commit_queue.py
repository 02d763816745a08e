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
import logging
import time
from collections.abc import Callable

from enroll_server.metrics import Histogram
from enroll_server.registry import Issuance, Registry, RegistryError

log = logging.getLogger("fleetpki.commit")

# Called once with None (recorded), the RegistryError that refused this issuance, or a
# CommitFailed when the whole transaction failed (nothing of the batch was recorded).
Done = Callable[[BaseException | None], None]


class CommitFailed(Exception):
    """The transaction holding this issuance failed as a whole; its cause is chained."""

    def __init__(self, cause: BaseException, size: int) -> None:
        super().__init__(f"registry commit of {size} issuances failed: {cause}")
        self.__cause__ = cause


BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class CommitQueue:
    """Collects issuances on the loop and records them with one `record_issuances` per batch.

    The first issuance after a quiet spell is flushed at once (`call_soon`: with whatever else
    the same loop iteration submitted), so an idle server adds no latency. While commits
    follow each other closely, the next flush waits until `window` seconds after the previous
    one, so a busy server commits in groups of everything signed meanwhile: a few ms of
    latency for a much cheaper commit per certificate. The flush runs on the loop thread, the
    only user of the registry connection on the hot path.

    A transaction costs about 330 us of server CPU whatever it holds (BEGIN/COMMIT, a
    statement per table, the WAL pages every issuance appends to) and about 40 us per
    issuance (BENCHMARKS.md). At ~900 enrollments/s, 5 ms groups ~7 issuances (~90 us each),
    15 ms ~15 (~60 us each) without moving p50 or p99 (queueing for the CPU dominates them);
    50 ms gained little more and added ~15 ms to p50.
    """

    def __init__(self, registry: Registry, window: float = 0.015, max_batch: int = 256) -> None:
        self.registry = registry
        self.window = window
        self.max_batch = max_batch
        self._last_flush = -1.0
        self._pending: list[tuple[Issuance, Done]] = []
        self._scheduled = False
        self.batches = Histogram(
            "fleetpki_registry_commit_batch",
            "Issuances recorded per registry transaction (group commit).",
            BATCH_BUCKETS,
        )

    def submit(self, issuance: Issuance, done: Done) -> None:
        """Queue `issuance`; `done(outcome)` is called from the loop after the commit."""
        loop = asyncio.get_running_loop()  # raises outside the loop, before anything is queued
        self._pending.append((issuance, done))
        if len(self._pending) >= self.max_batch:
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
        """Record everything queued now, in one transaction, and report each outcome."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._last_flush = time.monotonic()
        outcomes: list[BaseException | None]
        try:
            outcomes = list(self.registry.record_issuances([item for item, _ in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} issuances")
        except Exception as exc:  # every waiter must hear of it, not just one
            failed = CommitFailed(exc, len(batch))
            log.error("%s", failed)
            outcomes = [failed] * len(batch)
        else:
            self.batches.observe(float(len(batch)))
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            try:
                done(outcome)
            except Exception:
                log.exception("enrollment completion callback failed")
