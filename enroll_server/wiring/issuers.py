"""A running serve follows the home's issuing CAs: a rollover, a revoked issuer, a retirement.

`fleetpki ca rollover` and `ca revoke-issuing` only write files (home.issuers); this task looks
at them every few seconds and, when they changed, signs with the new current issuer, trusts
every live one (EST and broker TLS, /cacerts), serves each one's CRL and OCSP, and stops
serving those gone. It also retires, by itself, a previous issuer once its last certificate
has expired (home.issuers.retire_expired).

On a shared (PostgreSQL) registry it also follows the CA changes other nodes record there
(home.ca_state): woken by the registry's NOTIFY at their commit, and every CA_STATE_POLL
seconds as the safety net, it adopts a newer generation into this node's home, then looks at
the files at once. A home that cannot adopt (a key it cannot reach) keeps serving what it has,
logs why, and says so in /metrics (`fleetpki_ca_state_adopt_failing 1`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from cryptography import x509

from enroll_server.enrollment.service import EnrollmentService
from enroll_server.home.ca_state import ca_change, follow, home_generation
from enroll_server.home.issuers import (
    crl_route,
    current_key,
    load_current,
    previous_issuers,
    retire_expired,
)
from enroll_server.home.layout import HomeError, LoadedHome, load_home
from enroll_server.pki.ca import Issuer
from enroll_server.pki.errors import PkiError
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import PrivateKey
from enroll_server.pki.signer import Signer
from enroll_server.registry import Registry, RegistryError
from enroll_server.revocation.issuers import IssuerRevocation
from enroll_server.revocation.state import RevocationState
from enroll_server.web.state import AppState

log = logging.getLogger("fleetpki.issuers")

# Seconds between looks at the registry's CA state when no NOTIFY came: the bound on how late
# a node adopts another node's CA change if the notification is lost.
CA_STATE_POLL = 5.0
# What adopting another node's CA state may fail with; the node keeps serving what it has.
_ADOPT_ERRORS = (HomeError, PkiError, RegistryError, OSError, ValueError)


@dataclass(frozen=True, slots=True)
class IssuerSet:
    """The live issuing CAs as the home's files say: the current one, then the previous."""

    current: Issuer
    previous: tuple[Issuer, ...]
    files: bytes  # issuing.pem + chain.pem as read: what "changed" compares


def catch_up_at_start(loaded: LoadedHome, registry: Registry, now: datetime) -> LoadedHome:
    """The home as it is after adopting what other nodes recorded while this one was down
    (home.ca_state.follow); the home as it was, with the reason logged, if it cannot."""
    if not registry.shared:
        return loaded
    try:
        adopted = follow(loaded.layout, registry, now)
    except _ADOPT_ERRORS as exc:
        log.error(
            "cannot adopt the CA state other nodes recorded in the registry; serving CA "
            "generation %d: %s",
            home_generation(loaded.layout),
            exc,
        )
        return loaded
    if adopted is None:
        return loaded
    log.info("adopted CA state generation %d from the registry at start", adopted)
    return replace(load_home(loaded.layout.root), registry=loaded.registry)


class IssuerWatch:
    def __init__(
        self,
        loaded: LoadedHome,
        service: EnrollmentService,
        state: AppState,
        revocations: IssuerRevocation,
        make_state: Callable[[Issuer, str], RevocationState],
        tls_contexts: list[ssl.SSLContext],
        clock: Callable[[], datetime],
        interval: float,
        on_change: Callable[[], object] = lambda: None,
        on_adopt: Callable[[], object] = lambda: None,
    ) -> None:
        """`on_change`: called when the files changed (the root CRL may list a revoked one).
        `on_adopt`: called after another node's CA state was adopted (the TLS server
        certificate was renewed under the new issuer)."""
        self._loaded = loaded
        self._service = service
        self._state = state
        self._revocations = revocations
        self._make_state = make_state
        self._tls = tls_contexts
        self._clock = clock
        self._interval = interval
        self._on_change = on_change
        self._on_adopt = on_adopt
        self._seen = self._files()
        self._task: asyncio.Task[None] | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._checking = asyncio.Lock()
        self._registry: Registry | None = None  # follow's connection (worker thread)
        self.adopt_failure = ""  # why the last adoption failed, "" when none did
        self.adopted = 0

    def _files(self) -> bytes:
        layout = self._loaded.layout
        try:
            return layout.issuing_cert.read_bytes() + layout.chain.read_bytes()
        except OSError:
            return b""

    def _key_of(self, cert: x509.Certificate) -> PrivateKey | Signer:
        current = self._service.issuer
        if current.key.public_key() == cert.public_key():
            return current.key
        return current_key(self._loaded.layout, cert)  # a rollover's new key

    def load(self) -> IssuerSet | None:
        """The issuers, if the files changed since the last look (worker thread: decrypts keys)."""
        files = self._files()
        if files == self._seen:
            return None
        loaded = self._loaded
        current = load_current(loaded.layout, loaded.config, self._key_of)
        previous = previous_issuers(loaded.layout, loaded.config, current.cert)
        return IssuerSet(current, tuple(previous), files)

    def apply(self, found: IssuerSet) -> None:
        """Sign with, trust and serve the issuers `found` (on the event loop)."""
        layout = self._loaded.layout
        service, current = self._service, found.current
        if current.cert != service.issuer.cert:
            log.info(
                "issuing CA rolled over: now %s (%s)",
                current.cert.subject.rfc4514_string(),
                key_id(current.cert),
            )
            service.use_issuer(current)
        service.previous_issuers = tuple(i.cert for i in found.previous)
        root = self._state.ca_chain[-1]
        self._state.ca_chain = (
            current.cert,
            *service.previous_issuers,
            *self._loaded.intermediates,
            root,
        )
        for ctx in self._tls:
            # Adds the new issuer to what client certificates may chain to; an issuer gone
            # stays in the store until a restart, but the registry check refuses its
            # certificates (retired: all expired; revoked: all revoked).
            ctx.load_verify_locations(cafile=str(layout.chain))
        live = {key_id(i.cert): i for i in (current, *found.previous)}
        revocations = self._revocations
        for kid, issuer in live.items():
            if revocations.get(kid) is None:
                revocations.add(kid, self._make_state(issuer, kid), crl_route(layout, issuer.cert))
        revocations.current_id = key_id(current.cert)
        for kid in revocations.ids():
            if kid not in live:
                log.info("issuing CA %s is no longer live: its CRL and OCSP are not served", kid)
                revocations.remove(kid)
        self._seen = found.files
        self._on_change()

    def retire(self) -> list[str]:
        """Retire previous issuers whose certificates have all expired (worker thread)."""
        loaded = self._loaded
        if not self._service.previous_issuers:
            return []

        def crl_of(kid: str) -> bytes | None:
            state = self._revocations.get(kid)
            current = state.publisher.current if state is not None else None
            return None if current is None else current.der

        now = self._clock()
        with Registry.open(loaded.registry) as registry, ca_change(loaded.layout, registry, now):
            # As the files are now: ca_change may just have adopted another node's rollover.
            current = x509.load_pem_x509_certificate(loaded.layout.issuing_cert.read_bytes())
            retired = retire_expired(
                loaded.layout,
                loaded.config,
                current,
                registry.issuer_last_expiry,
                crl_of,
                now,
            )
        for kid in retired:
            log.info("issuing CA %s retired: its last certificate has expired", kid)
        return retired

    async def check(self) -> None:
        async with self._checking:
            await asyncio.to_thread(self.retire)
            found = await asyncio.to_thread(self.load)
            if found is not None:
                self.apply(found)

    def wake(self) -> None:
        """Look at the registry's CA state now (the registry's NOTIFY; on the event loop)."""
        self._wake.set()

    def follow(self) -> int | None:
        """Adopt a newer CA state from the registry (worker thread); the generation adopted.
        A failure is logged once per reason and kept in `adopt_failure`."""
        loaded = self._loaded
        try:
            if self._registry is None:
                self._registry = Registry.open(loaded.registry)
            adopted = follow(loaded.layout, self._registry, self._clock())
        except _ADOPT_ERRORS as exc:
            why = str(exc)
            if why != self.adopt_failure:
                log.error(
                    "cannot adopt the CA state other nodes recorded in the registry; this node "
                    "keeps serving its CA generation %d: %s",
                    home_generation(loaded.layout),
                    why,
                )
            self.adopt_failure = why
            if isinstance(exc, RegistryError) and self._registry is not None:
                self._registry.close()
                self._registry = None
            return None
        if self.adopt_failure:
            log.info("CA state adopted again after: %s", self.adopt_failure)
        self.adopt_failure = ""
        if adopted is not None:
            self.adopted += 1
            log.info("adopted CA state generation %d from the registry", adopted)
        return adopted

    async def follow_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CA_STATE_POLL)
            self._wake.clear()
            if await asyncio.to_thread(self.follow) is None:
                continue
            self._on_adopt()
            try:
                await self.check()
            except (HomeError, PkiError, OSError, ValueError) as exc:
                log.warning("reading the issuing CAs failed, trying again: %s", exc)

    def metrics_text(self) -> str:
        """Prometheus lines: the CA state generation of the home, whether adopting fails."""
        return (
            "# HELP fleetpki_ca_state_generation The registry's CA state generation this "
            "node's home is at.\n"
            "# TYPE fleetpki_ca_state_generation gauge\n"
            f"fleetpki_ca_state_generation {home_generation(self._loaded.layout)}\n"
            "# HELP fleetpki_ca_state_adopt_failing Whether this node cannot adopt the CA "
            "state other nodes recorded (then the log says what is missing).\n"
            "# TYPE fleetpki_ca_state_adopt_failing gauge\n"
            f"fleetpki_ca_state_adopt_failing {int(bool(self.adopt_failure))}\n"
        )

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except (HomeError, PkiError, OSError, ValueError) as exc:
                # A rollover half written (key and certificate not matching yet): next time.
                log.warning("reading the issuing CAs failed, trying again: %s", exc)
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self.run(), name="fleetpki-issuers")
        if self._shared():
            self._wake.set()  # a look at once: what was recorded while this node started
            self._follow_task = loop.create_task(self.follow_loop(), name="fleetpki-ca-state")

    def _shared(self) -> bool:
        from enroll_server.registry.location import PostgresLocation

        return isinstance(self._loaded.registry, PostgresLocation)

    def stop(self) -> None:
        for task in (self._task, self._follow_task):
            if task is not None:
                task.cancel()
        if self._registry is not None:
            self._registry.close()
            self._registry = None
