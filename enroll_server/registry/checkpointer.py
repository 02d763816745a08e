"""WAL checkpoints in a thread of their own, so that the server's event loop never runs one.

In WAL mode the commit that takes the log past `wal_autocheckpoint` pages copies the log back
into the database file within that same call, and syncs it (https://www.sqlite.org/wal.html,
"Automatic Checkpoint"). The server commits on its event loop, so every few thousand
enrollments one commit took 45-140 ms with a 100,000-device registry (more on slow storage):
every handshake, OCSP answer and broker session on the server waited that long. The server
therefore opens its loop's registry with a high automatic threshold (a backstop, should this
thread fall behind or die) and lets a Checkpointer do the work, on a connection of its own,
at the same WAL size, never waiting for a lock (see Checkpointer.checkpoint). sqlite3
releases the GIL while SQLite works, so the loop keeps running meanwhile.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path

from enroll_server.registry.store import WAL_AUTOCHECKPOINT_PAGES

log = logging.getLogger("fleetpki.registry")

# The event loop's connection checkpoints by itself only past this many WAL pages (~160 MB),
# 4x the threshold of other connections (store.WAL_AUTOCHECKPOINT_PAGES): only if the
# Checkpointer is not keeping up.
LOOP_AUTOCHECKPOINT_PAGES = 40_000


class Checkpointer:
    """Checkpoints the registry's WAL from a daemon thread, once it holds `pages` pages.

    The same threshold as the automatic one (store.WAL_AUTOCHECKPOINT_PAGES): a checkpoint
    copies each changed page back once however often it changed, so checkpointing sooner
    would copy more per enrollment. The thread looks every `interval` seconds; a WAL that
    stays below the threshold is still checkpointed after `idle` seconds, so that a quiet
    server does not keep its last writes in the log for good.
    """

    def __init__(
        self,
        path: Path,
        *,
        pages: int = WAL_AUTOCHECKPOINT_PAGES,
        interval: float = 0.5,
        idle: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.pages = pages
        self.interval = interval
        self.idle = idle
        self.runs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._busy = threading.Lock()  # one checkpoint at a time on the connection
        self._fd: int | None = None  # SQLite's descriptor of the WAL index (wal_pages)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        # Its own connection: a checkpoint must never wait on the loop's connection lock.
        # No busy wait: RESTART must not queue behind a writer (it would block the writers
        # after it); it tries again next interval.
        self._conn = sqlite3.connect(str(self.path), timeout=0, check_same_thread=False)
        self._thread = threading.Thread(
            target=self._run, name="fleetpki-wal-checkpoint", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after the checkpoint in progress, if any) and close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._busy:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def checkpoint(self) -> tuple[int, int]:
        """Checkpoint now: (pages in the WAL, pages of it now in the database).

        First PASSIVE, which copies the bulk without blocking anyone; then RESTART, which
        copies what writers appended meanwhile (little) and makes the next writer start the
        log over, so that the WAL stays small (a PASSIVE checkpoint alone, with commits
        arriving all the time, would never see the whole log copied: the WAL would grow
        without end, and every read would search a bigger WAL index). RESTART blocks writers
        while it runs; the server's commits then retry a few ms later (commit_queue), off
        the loop's back. With another writer or checkpointer busy it gives up at once and
        the next run tries again.
        """
        with self._busy:
            conn = self._conn
            if conn is None:
                raise RuntimeError("checkpointer not started")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            busy, log_pages, copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            self.runs += 1
        if busy:
            log.debug("WAL checkpoint did not finish: the WAL is in use; retrying later")
        return int(log_pages), int(copied)

    def wal_pages(self) -> int:
        """Pages in the WAL now (since its last restart), or 0 if there is none.

        Read from the WAL index's header (mxFrame, byte 16, native byte order:
        https://www.sqlite.org/walformat.html) without taking a lock or touching the
        database: the value may be a moment old, which only shifts one checkpoint a little.

        Read through the descriptor SQLite itself holds on the WAL index, never one of our
        own: closing any descriptor of a file drops every POSIX lock the process holds on it
        (fcntl(2)), SQLite's included. Opening and closing the -shm file here dropped the
        server's shared lock on the index every 0.5 s; the next process to open the registry
        (a CLI command, a restarted node) then believed itself alone, reset the index and
        truncated it under the server's mapping, and the server died of SIGBUS. 0 when no
        connection of this process has the index open, or without /proc (then only the idle
        checkpoint and the loop's backstop run).
        """
        fd = self._shm_fd()
        if fd is None:
            return 0
        try:
            header = os.pread(fd, 20, 0)
        except OSError:
            self._fd = None
            return 0
        return struct.unpack_from("=I", header, 16)[0] if len(header) == 20 else 0

    def _shm_fd(self) -> int | None:
        """SQLite's descriptor of `path`-shm in this process (/proc/self/fd), remembered."""
        target = os.path.realpath(f"{self.path}-shm")
        if self._fd is not None and _fd_target(self._fd) == target:
            return self._fd
        self._fd = None
        try:
            names = os.listdir("/proc/self/fd")
        except OSError:
            return None
        for name in names:
            if name.isdigit() and _fd_target(int(name)) == target:
                self._fd = int(name)
                break
        return self._fd

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            frames = self.wal_pages()
            if frames < self.pages and not (frames and time.monotonic() - last >= self.idle):
                continue
            try:
                self.checkpoint()
            except sqlite3.Error as exc:
                # Never fatal: the loop's connection checkpoints by itself past its backstop.
                log.warning("WAL checkpoint failed: %s", exc)
            last = time.monotonic()


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
