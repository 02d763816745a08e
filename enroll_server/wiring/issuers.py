"""A running serve follows the home's issuing CAs: a rollover, a revoked issuer, a retirement.

`fleetpki ca rollover` and `ca revoke-issuing` only write files (home.issuers); this task looks
at them every few seconds and, when they changed, signs with the new current issuer, trusts
every live one (EST and broker TLS, /cacerts), serves each one's CRL and OCSP, and stops
serving those gone. It also retires, by itself, a previous issuer once its last certificate
has expired (home.issuers.retire_expired).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from enroll_server.enrollment.service import EnrollmentService
from enroll_server.home.issuers import (
    crl_route,
    current_key,
    load_current,
    previous_issuers,
    retire_expired,
)
from enroll_server.home.layout import HomeError, LoadedHome
from enroll_server.pki.ca import Issuer
from enroll_server.pki.errors import PkiError
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import PrivateKey
from enroll_server.pki.signer import Signer
from enroll_server.registry import Registry
from enroll_server.revocation.issuers import IssuerRevocation
from enroll_server.revocation.state import RevocationState
from enroll_server.web.state import AppState

log = logging.getLogger("fleetpki.issuers")


@dataclass(frozen=True, slots=True)
class IssuerSet:
    """The live issuing CAs as the home's files say: the current one, then the previous."""

    current: Issuer
    previous: tuple[Issuer, ...]
    files: bytes  # issuing.pem + chain.pem as read: what "changed" compares


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
    ) -> None:
        """`on_change`: called when the files changed (the root CRL may list a revoked one)."""
        self._loaded = loaded
        self._service = service
        self._state = state
        self._revocations = revocations
        self._make_state = make_state
        self._tls = tls_contexts
        self._clock = clock
        self._interval = interval
        self._on_change = on_change
        self._seen = self._files()
        self._task: asyncio.Task[None] | None = None

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

        with Registry.open(loaded.registry) as registry:
            retired = retire_expired(
                loaded.layout,
                loaded.config,
                self._service.issuer.cert,
                registry.issuer_last_expiry,
                crl_of,
                self._clock(),
            )
        for kid in retired:
            log.info("issuing CA %s retired: its last certificate has expired", kid)
        return retired

    async def check(self) -> None:
        await asyncio.to_thread(self.retire)
        found = await asyncio.to_thread(self.load)
        if found is not None:
            self.apply(found)

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except (HomeError, PkiError, OSError, ValueError) as exc:
                # A rollover half written (key and certificate not matching yet): next time.
                log.warning("reading the issuing CAs failed, trying again: %s", exc)
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="fleetpki-issuers")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
