"""mosquitto-sync: keeps a mosquitto current with the registry (CRL, server pair, ACL, kicks).

What mosquitto 2.0.11 does (each point tested in tests/integration/test_revocation_mosquitto.py):
- it reads `crlfile` at start and again on SIGHUP; after the reload, a revoked certificate is
  refused at the TLS handshake. A client that is already connected stays connected, and so
  does one whose handshake was already under way when the reload happened (seen in tests).
- the dynamic-security plugin's `deleteClient` / `disableClient` commands kick every
  connected client whose *username* matches - and with `use_identity_as_username` the
  username of a device is its certificate CN, i.e. its device id. So the syncer creates a
  throw-away dynsec client named after the device and deletes it again: the device's live
  session ends, and its reconnect fails against the reloaded CRL. Because of handshakes in
  flight during the reload, the kick is repeated a little later (RECHECK_DELAYS).
- with `use_identity_as_username` mosquitto never asks dynsec to check a password, so the
  plugin authenticates nobody on the device listener; device ACLs stay in `acl_file`.
- `use_username_as_clientid` is a *listener* option in 2.0.11 (the man page lists it as
  general; placed before any `listener` it silently creates a default listener on 1883).
  Inside the device listener it forces client id = CN, so no device can take over
  another's session by reusing its client id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from enroll_server.broker.issuer_crls import CrlFeed
from enroll_server.broker.mosquitto_acl import render_acl
from enroll_server.broker.mosquitto_config import MosquittoFiles, write_crl
from enroll_server.broker.mosquitto_dynsec import DynsecControl
from enroll_server.broker.mosquitto_errors import MosquittoError, MosquittoNotRunning
from enroll_server.home.server_certificate import ServerCertificateError, read_pair
from enroll_server.registry.errors import RegistryError
from enroll_server.registry.models import EventKind
from fleetpki.atomic_file import PUBLIC_MODE, SECRET_MODE, write_atomic

log = logging.getLogger("fleetpki.mosquitto")

DEFAULT_SYNC_INTERVAL = 0.2
# mosquitto handles SIGHUP on its next loop turn; kicking before that lets a reconnect in.
RELOAD_SETTLE = 0.05
# A TLS handshake already under way at the reload is checked against the old CRL; kicking the
# same names again a little later ends sessions that slipped through that way.
RECHECK_DELAYS = (1.0, 5.0)
# How often mosquitto-sync re-reads the service identities for the ACL (issue/revoke of a
# service records no registry event; the list is short).
SERVICE_ACL_INTERVAL = 2.0


def read_pid(pidfile: Path) -> int:
    try:
        text = pidfile.read_text().strip()
    except OSError as exc:
        raise MosquittoNotRunning(str(pidfile), f"pid file unreadable: {exc}") from exc
    try:
        return int(text)
    except ValueError as exc:
        raise MosquittoNotRunning(str(pidfile), f"not a pid: {text[:20]!r}") from exc


def signal_reload(pid: int) -> None:
    """SIGHUP: mosquitto re-reads its configuration, crlfile included."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise MosquittoNotRunning(f"pid {pid}", "no such process") from exc
    except PermissionError as exc:
        raise MosquittoNotRunning(f"pid {pid}", "not allowed to signal it") from exc


def read_cursor(files: MosquittoFiles) -> int | None:
    try:
        return int(files.sync_cursor.read_text().strip())
    except (OSError, ValueError):
        return None


def save_cursor(files: MosquittoFiles, seq: int) -> None:
    write_atomic(files.sync_cursor, f"{seq}\n".encode(), PUBLIC_MODE)


@dataclass(frozen=True, slots=True)
class SyncRound:
    """What one sync round did."""

    crl_number: int | None  # the CRL written and reloaded this round, if any
    dropped: tuple[str, ...]  # device ids whose sessions were ended
    server_serial: int | None = None  # a renewed TLS server certificate handed over, if any


class MosquittoSync:
    """Keeps one mosquitto current: CRL file + SIGHUP on change, then drops revoked sessions.

    The order matters: the CRL is reloaded *before* a session is dropped, so the device's
    immediate reconnect is already refused at the handshake.

    `server_pair` (the home's tls/server.pem and server.key): mosquitto reads copies in its
    own folder; a renewed pair (`fleetpki serve` renews it at 2/3 of its lifetime) is copied
    there, key first, and mosquitto re-reads certfile and keyfile on the same SIGHUP as the
    CRL (mosquitto.conf(5)). A pair whose key does not match is never copied.
    """

    def __init__(
        self,
        publisher: CrlFeed,
        files: MosquittoFiles,
        pid: Callable[[], int],
        control: DynsecControl | None,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
        server_pair: tuple[Path, Path] | None = None,
        services: Callable[[], Iterable[str]] | None = None,
        acl_interval: float = SERVICE_ACL_INTERVAL,
        ca_chain: Path | None = None,
    ) -> None:
        self._server_pair = server_pair
        self._ca_chain = ca_chain
        self._services = services
        self._acl_interval = acl_interval
        self._acl_checked: float | None = None
        self._publisher = publisher
        self._files = files
        self._pid = pid
        self._control = control
        self._clock = clock
        self._monotonic = monotonic
        self._applied_crl: int | None = None
        self._to_drop: dict[str, None] = {}
        self._rechecks: list[tuple[float, str]] = []  # (due, device id)

    @property
    def rechecks_pending(self) -> int:
        return len(self._rechecks)

    def step(self) -> SyncRound:
        update = self._publisher.poll(self._clock())
        if self._control is not None:
            self._to_drop.update(dict.fromkeys(update.devices_to_drop()))
            resumed = {e.device_id.value for e in update.events if e.kind is EventKind.RESUMED}
            self._rechecks = [(due, d) for due, d in self._rechecks if d not in resumed]
        current = self._publisher.current
        applied = None
        server_serial = self._copy_server_pair()
        ca_changed = self._copy_ca_chain()
        crl_changed = current is not None and current.number != self._applied_crl
        if crl_changed:
            assert current is not None
            write_crl(self._files, current.pem)
        acl_services = self._refresh_acl()
        if crl_changed or server_serial is not None or acl_services is not None or ca_changed:
            signal_reload(self._pid())
            if ca_changed:
                log.info("mosquitto: CA file with the home's live issuing CAs loaded")
            if acl_services is not None:
                log.info("mosquitto: ACL with %d service identities loaded", acl_services)
            if current is not None and crl_changed:
                self._applied_crl = applied = current.number
                log.info("mosquitto: CRL #%d (%d entries) loaded", current.number, current.entries)
            if server_serial is not None:
                log.info("mosquitto: TLS server certificate serial %x loaded", server_serial)
            time.sleep(RELOAD_SETTLE)
        now = self._monotonic()
        due = [d for when, d in self._rechecks if when <= now]
        self._rechecks = [(when, d) for when, d in self._rechecks if when > now]
        dropped: tuple[str, ...] = ()
        if self._control is not None and (self._to_drop or due):
            fresh = tuple(self._to_drop)
            kept = self._control.kick([*fresh, *due])
            self._to_drop.clear()
            self._rechecks += [(now + delay, d) for delay in RECHECK_DELAYS for d in fresh]
            dropped = fresh
            if fresh:
                log.info("mosquitto: dropped sessions of %s", ", ".join(fresh))
            if kept:
                log.warning("mosquitto: dynsec clients %s left disabled", ", ".join(kept))
        if not self._to_drop:
            save_cursor(self._files, self._publisher.event_seq)
        return SyncRound(applied, dropped, server_serial)

    def _refresh_acl(self) -> int | None:
        """Rewrite the ACL if the service identities changed; their count if it did.

        Read every `acl_interval` seconds: issuing or revoking a service records no event.
        """
        if self._services is None:
            return None
        now = self._monotonic()
        if self._acl_checked is not None and now - self._acl_checked < self._acl_interval:
            return None
        self._acl_checked = now
        try:
            names = sorted(set(self._services()))
        except (RegistryError, sqlite3.Error) as exc:
            log.warning("mosquitto: service identities unreadable, ACL left as is: %s", exc)
            return None
        text = render_acl(names).encode()
        with contextlib.suppress(OSError):
            if self._files.acl.read_bytes() == text:
                return None
        write_atomic(self._files.acl, text, PUBLIC_MODE)
        return len(names)

    def _copy_ca_chain(self) -> bool:
        """Copy the home's chain.pem into mosquitto's cafile when it changed; True if so."""
        return self._ca_chain is not None and copy_ca_file(self._ca_chain, self._files.cafile)

    def _copy_server_pair(self) -> int | None:
        """Copy a changed, matching server pair into mosquitto's folder; its serial if so."""
        if self._server_pair is None:
            return None
        return copy_server_pair(self._server_pair, self._files.certfile, self._files.keyfile)

    def finish(self, max_wait: float) -> None:
        """Run the rechecks due within `max_wait` seconds (for one-shot runs), drop the rest."""
        limit = self._monotonic() + max_wait
        while any(when <= limit for when, _ in self._rechecks):
            nearest = min(when for when, _ in self._rechecks)
            time.sleep(max(0.0, nearest - self._monotonic()))
            self.step()
            self._rechecks = [(w, d) for w, d in self._rechecks if w <= limit]
        self._rechecks.clear()

    def run(self, interval: float, stop: threading.Event) -> None:
        """Sync every `interval` seconds until `stop` is set; failures are logged and retried."""
        run_rounds(self.step, interval, stop, MosquittoError, "mosquitto")


def run_rounds(
    step: Callable[[], object],
    interval: float,
    stop: threading.Event,
    retried: type[Exception] | tuple[type[Exception], ...],
    broker: str,
) -> None:
    """A syncer's loop: one `step` every `interval` seconds until `stop` is set; a `retried`
    failure is logged and the round tried again (the registry cursor has not moved)."""
    while not stop.is_set():
        try:
            step()
        except retried as exc:
            log.warning("%s sync round failed, retrying: %s", broker, exc)
        stop.wait(interval)


def copy_ca_file(chain: Path, cafile: Path) -> bool:
    """Copy the home's chain.pem (every live issuing CA: a rollover, a retirement, a revoked
    issuer gone) over a broker's CA file when it differs; True if it was copied."""
    try:
        pem = chain.read_bytes()
    except OSError as exc:
        log.warning("%s unreadable, the broker's CA file left as is: %s", chain, exc)
        return False
    with contextlib.suppress(OSError):
        if cafile.read_bytes() == pem:
            return False
    write_atomic(cafile, pem, PUBLIC_MODE)
    return True


def copy_server_pair(server_pair: tuple[Path, Path], certfile: Path, keyfile: Path) -> int | None:
    """Copy a changed, matching TLS server pair (the home's, renewed by `fleetpki serve`)
    to a broker's own files, key first; the new certificate's serial if it was copied.
    A pair whose key does not match is never copied."""
    try:
        chain_pem, key_pem, leaf = read_pair(*server_pair)
    except ServerCertificateError as exc:
        log.warning("TLS server certificate not handed over to the broker: %s", exc)
        return None
    with contextlib.suppress(OSError):
        if certfile.read_bytes() == chain_pem and keyfile.read_bytes() == key_pem:
            return None
    try:
        owner = keyfile.stat()
    except OSError:
        owner = None
    write_atomic(keyfile, key_pem, SECRET_MODE)
    if owner is not None and os.geteuid() == 0:
        # the broker may have dropped to its own account: it must still read its key.
        os.chown(keyfile, owner.st_uid, owner.st_gid)
    write_atomic(certfile, chain_pem, PUBLIC_MODE)
    return leaf.serial_number


class ServiceLister(Protocol):
    def list_devices(
        self, *, role: str | None = None, limit: int = 1000, offset: int = 0
    ) -> Sequence[Any]: ...


def service_names(registry: ServiceLister, page: int = 1000) -> list[str]:
    """The registry's service identities that may still connect (any state but revoked)."""
    names: list[str] = []
    offset = 0
    while True:
        rows = registry.list_devices(role="service", limit=page, offset=offset)
        names += [str(d.device_id) for d in rows if str(d.state) != "revoked"]
        if len(rows) < page:
            return names
        offset += page
