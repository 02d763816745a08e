"""Registry changes pushed to every node: PostgreSQL LISTEN/NOTIFY on the events table.

The `events` table stays the truth: a trigger (schema.py, PostgreSQL baseline) sends a NOTIFY
on channel `fleetpki_events` with every statement that inserts events, delivered when that
transaction commits. A node's `EventListener` holds one connection that LISTENs and, on each
notification, calls its callbacks, which read the events since their own last sequence
number (the broker's revocation watcher, the CRL refresh): a revocation made through node A
reaches node B's broker, CRL and OCSP within a round trip instead of at the next poll. The
polls stay as the safety net, and after the listening connection is lost and re-made the
callbacks run once more, since notifications sent meanwhile are gone (the catch-up read).
A new CA state generation (registry/ca_state.py) notifies on the same channel with the
payload CA_STATE_PAYLOAD, which wakes only the callbacks registered for it (`on`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import psycopg

from enroll_server.registry.location import PostgresLocation
from enroll_server.registry.postgres import _params, _why

log = logging.getLogger("fleetpki.registry")

CHANNEL = "fleetpki_events"
# The payload of a new CA state generation's notification (schema 10's trigger); events
# notify with an empty one.
CA_STATE_PAYLOAD = "ca_state"
# How long one wait for notifications lasts: the bound on how late `stop` is noticed.
_WAIT_S = 0.5
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 5.0


class EventListener:
    """A thread that LISTENs on `fleetpki_events` and calls `callbacks` on each change."""

    def __init__(self, location: PostgresLocation, callbacks: Sequence[Callable[[], object]]):
        self.location = location
        self.callbacks = list(callbacks)
        # Called only for notifications with that payload (and after a reconnect).
        self.payload_callbacks: dict[str, list[Callable[[], object]]] = {}
        self.notifications = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._conn: psycopg.Connection[object] | None = None
        self._thread = threading.Thread(target=self._run, name="fleetpki-listen", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once LISTEN is in place (or after `timeout`)."""
        self._thread.start()
        self._listening.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(_WAIT_S * 4)

    def on(self, payload: str, callback: Callable[[], object]) -> None:
        """Call `callback` on each notification carrying `payload` (CA_STATE_PAYLOAD: a new
        CA state generation), not on every event."""
        self.payload_callbacks.setdefault(payload, []).append(callback)

    def _fire(self, payload: str | None = None) -> None:
        """The callbacks for a notification with `payload`; None (a reconnect): all of them."""
        chosen = list(self.callbacks)
        for key, more in list(self.payload_callbacks.items()):
            if payload is None or key == payload:
                chosen += more
        for callback in chosen:
            try:
                callback()
            except Exception:  # one failing callback must not silence the others
                log.exception("a registry change callback failed")

    def _run(self) -> None:
        delay = _RETRY_FIRST_S
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.location.url, autocommit=True, **_params(self.location)
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    if not first:
                        self.reconnects += 1
                        log.info("listening for registry changes again; catching up")
                        self._fire()  # what was notified while we were away is lost
                    first, delay = False, _RETRY_FIRST_S
                    while not self._stop.is_set():
                        # Each notification wakes the readers at once; a burst of them costs
                        # a few extra wake-ups, each an indexed read of nothing new.
                        for note in conn.notifies(timeout=_WAIT_S):
                            self.notifications += 1
                            self._fire(note.payload)
                            if self._stop.is_set():
                                break
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                log.warning(
                    "listening for registry changes failed (%s); polling covers it, retrying "
                    "in %.1f s",
                    _why(exc),
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
