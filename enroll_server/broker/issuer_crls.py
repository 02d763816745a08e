"""The CRLs an external broker loads when several issuing CAs live (after `fleetpki ca rollover`).

mosquitto checks a client certificate against the CRL of its issuer (crlfile, OpenSSL's
X509_V_FLAG_CRL_CHECK): with two live issuing CAs its crlfile must hold both CRLs, or every
certificate of the one missing is refused ("unable to get certificate CRL"). IssuerCrls keeps
one CrlPublisher per live issuer of the home (home.issuers), follows the home's files (a
rollover, a retirement, a revocation) and hands the syncer what a single publisher did:
`poll(now)`, `current` (every CRL, PEM, one after the other) and `event_seq`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509

from enroll_server.home.issuers import current_key, load_current, previous_issuers
from enroll_server.home.layout import HomeError, LoadedHome
from enroll_server.pki.errors import PkiError
from enroll_server.pki.key_id import key_id
from enroll_server.pki.keys import PrivateKey
from enroll_server.pki.signer import Signer
from enroll_server.revocation.publisher import CrlPublisher, CrlUpdate, RevocationSource


class CrlFile(Protocol):
    """What a syncer writes for its broker: a CRL file's bytes and how to tell it changed."""

    @property
    def pem(self) -> bytes: ...
    @property
    def number(self) -> int: ...
    @property
    def entries(self) -> int: ...


class CrlFeed(Protocol):
    """What a broker syncer polls: a CrlPublisher (one issuer) or IssuerCrls (every one)."""

    def poll(self, now: datetime) -> CrlUpdate: ...
    @property
    def current(self) -> CrlFile | None: ...
    @property
    def event_seq(self) -> int: ...


log = logging.getLogger("fleetpki.broker")


@dataclass(frozen=True, slots=True)
class IssuerCrlSet:
    """Every live issuer's current CRL, for one crlfile."""

    pem: bytes  # the CRLs, PEM, concatenated (OpenSSL loads every CRL of a PEM file)
    number: int  # the highest CRL number: a new one whenever any of them is rebuilt
    entries: int
    issuers: int


class IssuerCrls:
    def __init__(
        self,
        registry: RevocationSource,
        loaded: LoadedHome,
        *,
        next_update: timedelta,
        since_seq: int | None = None,
    ) -> None:
        self._registry = registry
        self._loaded = loaded
        self._next_update = next_update
        self._since = since_seq
        self._publishers: dict[str, CrlPublisher] = {}
        self._current_id = ""
        self._seen = b""
        self._key = loaded.issuer.key
        self.follow()

    def _files(self) -> bytes:
        layout = self._loaded.layout
        try:
            return layout.issuing_cert.read_bytes() + layout.chain.read_bytes()
        except OSError:
            return self._seen

    def _key_of(self, cert: x509.Certificate) -> PrivateKey | Signer:
        if self._key.public_key() == cert.public_key():
            return self._key
        return current_key(self._loaded.layout, cert)  # a rollover's new key

    def follow(self) -> bool:
        """Take up the home's live issuers if its files changed; True if they did. Files that
        cannot be read as a whole (a rollover half written) leave the issuers as they were
        until a later round; the first look must succeed (HomeError)."""
        files = self._files()
        if files == self._seen:
            return False
        loaded = self._loaded
        try:
            current = load_current(loaded.layout, loaded.config, self._key_of)
            live = [current, *previous_issuers(loaded.layout, loaded.config, current.cert)]
        except (HomeError, PkiError, OSError, ValueError) as exc:
            if not self._publishers:
                raise
            log.warning("the home's issuing CAs unreadable, CRLs left as they are: %s", exc)
            return False
        # New publishers report events from where the current one is, so none is lost.
        since = self._since if not self._publishers else self.event_seq
        publishers = {}
        for issuer in live:
            kid = key_id(issuer.cert)
            publishers[kid] = self._publishers.get(kid) or CrlPublisher(
                self._registry,
                issuer,
                next_update=self._next_update,
                since_seq=since,
                issuer_key_id=kid,
            )
        self._publishers = publishers
        self._current_id = key_id(current.cert)
        self._key = current.key
        self._seen = files
        return True

    @property
    def event_seq(self) -> int:
        return self._publishers[self._current_id].event_seq

    def poll(self, now: datetime) -> CrlUpdate:
        """Every issuer's CRL rebuilt as its publisher decides; the revocation events as the
        current issuer's publisher reports them (each publisher reads every event)."""
        self.follow()
        # A new issuer's publisher has no CRL yet: its poll builds one.
        updates = {kid: p.poll(now) for kid, p in self._publishers.items()}
        return CrlUpdate(None, updates[self._current_id].events)

    def publish(self, now: datetime) -> IssuerCrlSet:
        for publisher in self._publishers.values():
            publisher.publish(now)
        current = self.current
        assert current is not None
        return current

    @property
    def current(self) -> IssuerCrlSet | None:
        published = [p.current for p in self._publishers.values()]
        if any(p is None for p in published):
            return None
        crls = [p for p in published if p is not None]
        return IssuerCrlSet(
            pem=b"".join(p.pem for p in crls),
            number=max(p.number for p in crls),
            entries=sum(p.entries for p in crls),
            issuers=len(crls),
        )
