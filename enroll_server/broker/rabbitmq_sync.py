"""rabbitmq-sync: keeps RabbitMQ current with the registry (CRL file, server pair, live kicks).

What RabbitMQ 3.10.8 does (each point tested in tests/integration/test_rabbitmq.py):
- the CRL in `crl/<hash>.r0` is read at each TLS handshake: a replaced file refuses a revoked
  certificate's next connect without a restart, but open connections stay open.
- `DELETE /api/connections/username/<id>` on the management API ends every connection of
  that user on every node of the cluster within milliseconds (`rabbitmqctl
  close_all_user_connections` does nothing to MQTT connections).
- Erlang's TLS keeps the server certificate files it read in its PEM cache: a renewed pair
  copied into the folder is presented only after `ssl:clear_pem_cache()` on each node
  (PemCacheClear, through rabbitmqctl: it needs the node's Erlang cookie), or a restart.
Order per round: the CRL file first, then the kicks, so an immediate reconnect is refused at
the handshake. A kick that fails (RabbitMQ down) is kept and retried; the cursor of
registry events moves only when every kick is done, so a restarted syncer catches up.
"""

from __future__ import annotations

import base64
import http.client
import logging
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from enroll_server.broker.issuer_crls import CrlFeed
from enroll_server.broker.mosquitto_sync import (
    RECHECK_DELAYS,
    copy_ca_file,
    copy_server_pair,
    run_rounds,
)
from enroll_server.broker.rabbitmq_auth import SYNC_USERNAME
from enroll_server.broker.rabbitmq_config import RabbitConfigError, RabbitFiles, write_crl
from fleetpki.atomic_file import PUBLIC_MODE, write_atomic

log = logging.getLogger("fleetpki.rabbitmq")

KICK_TIMEOUT = 2.0


class ManagementUnavailable(RabbitConfigError):
    """No management API answered a kick (RabbitMQ down, or the password refused)."""


@dataclass(frozen=True, slots=True)
class Management:
    """The management API of the cluster's nodes (loopback ports); the password comes from a
    file (never the command line), and it is sent only in the Authorization header."""

    ports: tuple[int, ...]
    password: str
    host: str = "127.0.0.1"

    def close_user_connections(self, username: str) -> None:
        """Drop every connection of `username` on every node (one node is asked; the next is
        tried when it does not answer)."""
        path = "/api/connections/username/" + urllib.parse.quote(username, safe="")
        auth = base64.b64encode(f"{SYNC_USERNAME}:{self.password}".encode()).decode()
        problems = []
        for port in self.ports:
            conn = http.client.HTTPConnection(self.host, port, timeout=KICK_TIMEOUT)
            try:
                conn.request("DELETE", path, headers={"Authorization": f"Basic {auth}"})
                status = conn.getresponse().status
            except OSError as exc:
                problems.append(f"port {port}: {exc}")
                continue
            finally:
                conn.close()
            if status in (204, 404):  # 404: no connection of that user right now
                return
            problems.append(f"port {port}: HTTP {status}")
        raise ManagementUnavailable(f"kick of {username} failed: {'; '.join(problems)}")


@dataclass(frozen=True, slots=True)
class PemCacheClear:
    """Makes each node re-read its certificate files: `rabbitmqctl -n NODE eval
    'ssl:clear_pem_cache().'` (run as the account whose HOME holds the Erlang cookie)."""

    nodes: tuple[str, ...]
    rabbitmqctl: str = "rabbitmqctl"
    env: dict[str, str] | None = None

    def __call__(self) -> None:
        for node in self.nodes:
            try:
                done = subprocess.run(
                    [self.rabbitmqctl, "-n", node, "eval", "ssl:clear_pem_cache()."],
                    env=self.env,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("rabbitmq: %s: PEM cache not cleared: %s", node, exc)
                continue
            if done.returncode != 0:
                why = (done.stdout + done.stderr).decode(errors="replace").strip()[-200:]
                log.warning("rabbitmq: %s: PEM cache not cleared: %s", node, why)


def read_cursor(files: RabbitFiles) -> int | None:
    try:
        return int(files.sync_cursor.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class RabbitRound:
    crl_number: int | None
    dropped: tuple[str, ...]
    server_serial: int | None = None


class RabbitSync:
    """One syncer for a RabbitMQ cluster: CRL file, server pair, kicks (see the module doc)."""

    def __init__(
        self,
        publisher: CrlFeed,
        files: RabbitFiles,
        management: Management,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
        server_pair: tuple[Path, Path] | None = None,
        reload_certificates: Callable[[], None] | None = None,
        recheck_delays: Sequence[float] = RECHECK_DELAYS,
        ca_chain: Path | None = None,
    ) -> None:
        self._publisher = publisher
        self._ca_chain = ca_chain
        self._files = files
        self._management = management
        self._clock = clock
        self._monotonic = monotonic
        self._server_pair = server_pair
        self._reload_certificates = reload_certificates
        self._recheck_delays = tuple(recheck_delays)
        self._applied_crl: int | None = None
        self._to_drop: dict[str, None] = {}
        self._rechecks: list[tuple[float, str]] = []

    def step(self) -> RabbitRound:
        update = self._publisher.poll(self._clock())
        self._to_drop.update(dict.fromkeys(update.devices_to_drop()))
        current = self._publisher.current
        applied = None
        if current is not None and current.number != self._applied_crl:
            write_crl(self._files, current.pem)
            self._applied_crl = applied = current.number
            log.info("rabbitmq: CRL #%d (%d entries) written", current.number, current.entries)
        serial = None
        if self._server_pair is not None:
            serial = copy_server_pair(self._server_pair, self._files.certfile, self._files.keyfile)
            if serial is not None:
                log.info("rabbitmq: TLS server certificate serial %x copied", serial)
        ca_changed = self._copy_ca_chain()
        if ca_changed:
            log.info("rabbitmq: CA file with the home's live issuing CAs copied")
        if serial is not None or ca_changed:
            if self._reload_certificates is not None:
                self._reload_certificates()
            else:
                log.warning(
                    "rabbitmq: the nodes use the old server certificate and CA file until "
                    "ssl:clear_pem_cache() or a restart (rabbitmq-sync --node)"
                )
        now = self._monotonic()
        # A handshake under way while the CRL file was replaced may have read the old one:
        # the same users are kicked again a little later.
        due = [d for when, d in self._rechecks if when <= now]
        self._rechecks = [(when, d) for when, d in self._rechecks if when > now]
        dropped = []
        for device in [*self._to_drop, *due]:
            fresh = device in self._to_drop
            self._management.close_user_connections(device)  # raises: kept for the next round
            if fresh:
                del self._to_drop[device]
                dropped.append(device)
                self._rechecks += [(now + delay, device) for delay in self._recheck_delays]
        if dropped:
            log.info("rabbitmq: dropped sessions of %s", ", ".join(dropped))
        write_atomic(
            self._files.sync_cursor, f"{self._publisher.event_seq}\n".encode(), PUBLIC_MODE
        )
        return RabbitRound(applied, tuple(dropped), serial)

    def _copy_ca_chain(self) -> bool:
        """Copy the home's chain.pem over the nodes' cafile when it changed; True if so."""
        return self._ca_chain is not None and copy_ca_file(self._ca_chain, self._files.cafile)

    def run(self, interval: float, stop: threading.Event) -> None:
        run_rounds(self.step, interval, stop, RabbitConfigError, "rabbitmq")
