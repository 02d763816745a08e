"""TokenIndex: the registry's unused enrollment tokens in memory, a one-time pass each.

Why: a first enrollment (RFC 7030 3.2.3, HTTP Basic with the one-time token) used to start
with a registry read, token joined with device. Run between TLS handshakes and signatures,
with SQLite's pages and code evicted from the caches by them, that read cost ~45 us of the
~0.9 ms of server CPU an enrollment takes (BENCHMARKS.md, "Enrollment"); a dictionary lookup
costs ~1 us.

Never the authority. The transaction that records an issuance (Registry.record_issuances)
spends the token only if it is still this device's, unused and unexpired, and activates the
device only if it is provisioned or active; otherwise it refuses and records nothing. The
index only lets authorization skip the read for a token that was valid when the index last
looked. An entry gone stale (the token reissued or spent, or the device revoked, by another
process since) costs one signature that is thrown away: the commit refuses, and the client
hears what the read would have told it, down to the replay of a lost reply when another
server spent the token on this very key (EnrollmentService.settle). Everything the index does not
vouch for (a token it has not seen, another device's token, an expired one) takes the
registry read as before, with its exact reasons and the replay of a lost reply.

A one-time pass: `take` removes the entry it vouches for. A token is vouched for once; a
second request with it (a retry after a lost reply, a concurrent duplicate) reads the
registry, which knows whether the first was recorded.

Loading follows the tokens table's rowid: tokens are only ever inserted (a reissue inserts
a row and spends the old one), so everything past the last rowid read is new. The index
reads the table at start-up, and again when the registry vouched for a token the index did
not know (a factory batch created by `fleetpki batch create` since), at most once per
`min_interval` seconds, in slices of `chunk` rowids so that the event loop is never held
for more than a few ms. Past `limit` entries it stops adding: tokens beyond that take the
registry read, correctly, at the old cost.

Several nodes on one PostgreSQL registry each keep an index; none is the authority, so a token
spent at node B and then presented at node A is refused by A's commit (tested in
tests/integration/test_registry_postgres_serve.py). The rowid rule holds there too: writers
take the registry's write lock (registry.postgres), so rowid order is commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable
from datetime import datetime

from enroll_server.registry import Registry, RegistryBusy, Role
from fleetpki.clock import utc_now

log = logging.getLogger("fleetpki.tokens")

# ~260 bytes per entry (measured): 200,000 unused tokens (two large factory batches) ~52 MB.
TOKEN_INDEX_LIMIT = 200_000
# Rowids per read on the event loop: 500 rows take ~2 ms (4.3 us a row, measured).
CHUNK_ROWS = 500
# Seconds between two reads prompted by tokens the index did not know.
MIN_INTERVAL = 1.0
# Seconds between two reads of a registry that was locked or unreachable.
_RETRY_S = 1.0
_ROLES = {role.value: role for role in Role}


class TokenIndex:
    """Unused tokens by device id: (SHA-256 of the token, its expiry, the device's role)."""

    def __init__(
        self,
        registry: Registry,
        *,
        limit: int = TOKEN_INDEX_LIMIT,
        chunk: int = CHUNK_ROWS,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utc_now,
    ) -> None:
        self.registry = registry
        self.limit = limit
        self.chunk = chunk
        self.min_interval = min_interval
        self._clock = clock
        self._wall = wall
        # (SHA-256 of the token, expiry as a POSIX timestamp, role value): compact atoms only,
        # so the cyclic garbage collector untracks each tuple once and never scans it again.
        self._entries: dict[str, tuple[bytes, float, str]] = {}
        self._last_rowid = 0  # every tokens row up to this one has been read
        self._target = 0  # read up to this rowid (max(rowid) when the current read began)
        self._last_read = float("-inf")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.full = False  # `limit` reached at least once: some tokens take the registry read

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._entries

    # --- the hot path ------------------------------------------------------------------
    def take(self, device_id: str, token_hash: str, now: datetime) -> Role | None:
        """The device's role if `token_hash` is its unused, unexpired token as last read, and
        the entry is removed; None (entry kept) if the index cannot vouch for it."""
        entry = self._entries.get(device_id)
        if (
            entry is None
            or entry[1] <= now.timestamp()
            or not hmac.compare_digest(entry[0], bytes.fromhex(token_hash))
        ):
            return None
        del self._entries[device_id]
        return _ROLES[entry[2]]

    def discard(self, device_id: str) -> None:
        """Forget the device's token (revoked or suspended in this process)."""
        self._entries.pop(device_id, None)

    def unknown_token_seen(self) -> None:
        """The registry vouched for a token the index did not hold: read what is new."""
        self._wake.set()

    # --- loading -----------------------------------------------------------------------
    def read_slice(self) -> bool:
        """Read the next slice of new tokens rows; True while rows remain to be read."""
        if self._last_rowid >= self._target:
            self._target = self.registry.max_token_rowid()
            self._last_read = self._clock()
            if self._last_rowid >= self._target:
                return False
        upto = min(self._last_rowid + self.chunk, self._target)
        entries = self._entries
        now = self._wall()
        for token in self.registry.unused_tokens(self._last_rowid, upto):
            key = token.device_id.value
            if token.expires_at <= now:
                entries.pop(key, None)  # a reissue that expired already replaces nothing useful
                continue
            # A device has one unused token at most; a later row is a reissue and replaces it.
            if key in entries or len(entries) < self.limit:
                entries[key] = (
                    bytes.fromhex(token.token_hash),
                    token.expires_at.timestamp(),
                    token.role.value,
                )
            elif not self.full:
                self.full = True
                log.warning(
                    "token index full (%d unused tokens): further tokens are checked in the "
                    "registry, at the old cost per enrollment",
                    self.limit,
                )
        self._last_rowid = upto
        return upto < self._target

    def read_all(self) -> None:
        """Read every new tokens row now (tests; the server reads in slices)."""
        while self.read_slice():
            pass

    async def _keep_fresh(self) -> None:
        while True:
            # Cleared before reading: a token met during a long read wakes the next one.
            self._wake.clear()
            more = True
            while more:
                try:
                    more = self.read_slice()
                except RegistryBusy as exc:
                    # Locked or unreachable (PostgreSQL restarting): the index only goes
                    # stale meanwhile (tokens it lacks take the registry read); read again.
                    log.warning("token index: %s; retrying in %.0f s", exc, _RETRY_S)
                    await asyncio.sleep(_RETRY_S)
                await asyncio.sleep(0)  # let connections run between two slices
            await self._wake.wait()
            wait = self._last_read + self.min_interval - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)

    def start(self) -> None:
        """Read the table, then again whenever unknown_token_seen; on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._keep_fresh(), name="fleetpki-token-index"
            )
            self._task.add_done_callback(_log_failure)

    def metrics_text(self) -> str:
        """Prometheus lines: how many tokens the index holds, and whether it ever filled up."""
        return (
            "# HELP fleetpki_token_index_entries Unused enrollment tokens held in memory.\n"
            "# TYPE fleetpki_token_index_entries gauge\n"
            f"fleetpki_token_index_entries {len(self._entries)}\n"
            "# HELP fleetpki_token_index_full 1 once the index reached its limit: further "
            "tokens are checked in the registry.\n"
            "# TYPE fleetpki_token_index_full gauge\n"
            f"fleetpki_token_index_full {int(self.full)}\n"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Enrollment goes on through the registry read; only the shortcut is lost.
        log.error("token index stopped reading the registry", exc_info=task.exception())
