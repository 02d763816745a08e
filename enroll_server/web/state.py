"""AppState: what every HTTP handler reaches through `request.app[APP_STATE]`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from cryptography import x509

from enroll_server.enrollment.commit_queue import CommitQueue
from enroll_server.enrollment.metrics import Metrics
from enroll_server.enrollment.service import EnrollmentService
from enroll_server.enrollment.throttle import Throttle
from enroll_server.home.layout import LoadedHome
from enroll_server.registry import Registry
from enroll_server.web.provisioner import Provisioner
from fleetpki.clock import utc_now


@dataclass
class AppState:
    service: EnrollmentService
    registry: Registry
    ca_chain: tuple[x509.Certificate, ...]  # issuing CA, then root (RFC 7030 4.1.3)
    metrics: Metrics = field(default_factory=Metrics)
    throttle: Throttle = field(default_factory=Throttle)
    clock: Callable[[], datetime] = utc_now
    home: LoadedHome | None = None  # config and layout, for operator routes (batches)
    # Batch creation and new device tokens (admin API), passed in by whoever wires the server.
    provisioner: Provisioner | None = None
    # Hooks set by `serve`: drop a device's live broker session at once (in-process path);
    # called with (device id, "revoked" | "suspended").
    on_revocation: list[Callable[[str, str], Any]] = field(default_factory=list)
    # Hooks run after any registry change that affects revocation data (CRL/OCSP rebuild).
    on_change: list[Callable[[], Any]] = field(default_factory=list)
    # What the console shows as live, where this process knows it: the embedded broker's
    # sessions (device id -> certificate serial) and the CRL being served (PublishedCrl).
    live_sessions: Callable[[], Mapping[str, int]] | None = None
    current_crl: Callable[[], Any] | None = None
    # The root certificates /cacerts carries after the issuing CAs, read when asked (a root
    # rollover shows at once): the root, then its cross-certificates and the old root
    # (home/root_update.py current_roots). None: ca_chain's own root.
    roots: Callable[[], tuple[x509.Certificate, ...]] | None = None

    # Group commit of issuances (one registry transaction per loop iteration).
    commits: CommitQueue = field(init=False)

    def __post_init__(self) -> None:
        self.commits = CommitQueue(self.registry)
        self.metrics.extra.append(lambda: "\n".join(self.commits.batches.render()) + "\n")

    def cacerts(self) -> tuple[x509.Certificate, ...]:
        """What GET /cacerts answers (RFC 7030 4.1.3): the issuing CAs (and intermediates),
        then the roots; after a root rollover, the new root, the old-signed-new and
        new-signed-old certificates and the old root."""
        if self.roots is None:
            return self.ca_chain
        return (*self.ca_chain[:-1], *self.roots())

    def on_registry_change(self) -> None:
        for hook in self.on_change:
            hook()


APP_STATE = web.AppKey("fleetpki_state", AppState)
