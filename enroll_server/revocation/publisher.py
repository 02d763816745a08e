"""The CRL publisher: builds the issuing CA's CRL from the registry's revocation events.

No sockets, no files and no aiohttp here: the HTTP edge (revocation.routes) serves `current`,
the mosquitto sync process (broker.mosquitto_sync) writes it to disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.pki.ca import Issuer
from enroll_server.pki.crl import build_crl, crl_needs_refresh, crl_refresh_at
from enroll_server.registry.models import CertificateRecord, Event, EventKind, RevokedEntry

_EVENT_PAGE = 10_000


class RevocationSource(Protocol):
    """The part of registry.Registry the revocation publisher reads."""

    def revoked_entries(
        self, now: datetime, issuer_key_id: str | None = None
    ) -> list[RevokedEntry]: ...

    def crl_number_next(self) -> int: ...

    def revocation_events_since(self, seq: int, *, limit: int = ...) -> tuple[list[Event], int]: ...

    def last_event_seq(self) -> int: ...

    def get_certificate(self, serial: int) -> CertificateRecord | None: ...


# Event kinds that change what the CRL lists (ISSUED, in older registries only, does not).
CRL_EVENTS = frozenset(
    {
        EventKind.REVOKED,
        EventKind.SUSPENDED,
        EventKind.RESUMED,
        EventKind.CERT_REVOKED,
        EventKind.SUPERSEDED,
    }
)
# Event kinds after which an identity's live sessions on mosquitto must end. An operator's
# certificate revocation is one (mosquitto cannot tell which certificate a session presented:
# the identity reconnects with its current one). A certificate superseded by its renewal is
# not: the renewed identity is reconnecting anyway, and the CRL refuses the old one.
DROP_EVENTS = frozenset({EventKind.REVOKED, EventKind.SUSPENDED, EventKind.CERT_REVOKED})


@dataclass(frozen=True, slots=True)
class PublishedCrl:
    """One signed CRL in both encodings, with what the HTTP edge and the syncers need."""

    crl: x509.CertificateRevocationList
    der: bytes
    pem: bytes
    number: int
    entries: int
    event_seq: int  # every registry event up to this seq is reflected
    build_seconds: float

    @property
    def this_update(self) -> datetime:
        return self.crl.last_update_utc

    @property
    def next_update(self) -> datetime | None:
        return self.crl.next_update_utc

    @property
    def refresh_at(self) -> datetime:
        return crl_refresh_at(self.crl)

    @property
    def etag(self) -> str:
        return f'"crl-{self.number}"'


@dataclass(frozen=True, slots=True)
class CrlUpdate:
    """What one poll found: the new CRL (if rebuilt) and the events seen since the last poll."""

    published: PublishedCrl | None
    events: list[Event]

    def devices_to_drop(self) -> list[str]:
        """Device ids with a revocation or suspension among the events, in order, once each."""
        seen: dict[str, None] = {}
        for event in self.events:
            if event.kind in DROP_EVENTS:
                seen.setdefault(event.device_id.value)
        return list(seen)


class CrlPublisher:
    """Builds the issuing CA's CRL from the registry and knows when to build it again.

    Rebuilds when a revocation event (revoke, suspend, resume) appears in the registry's
    event log - whichever process wrote it - and when the current CRL reaches half its
    lifetime. No sockets and no files here: the HTTP edge serves `current`, the mosquitto
    syncer writes it to disk.
    """

    def __init__(
        self,
        registry: RevocationSource,
        issuer: Issuer,
        *,
        next_update: timedelta = timedelta(hours=24),
        idp_url: str | None = None,
        since_seq: int | None = None,
        issuer_key_id: str | None = None,
    ) -> None:
        """`since_seq`: report events after this seq (default: only those from now on).
        `issuer_key_id`: list only that issuing CA's certificates (several live after a
        rollover, each with its own CRL: home.issuers); None lists every one."""
        url = idp_url or (issuer.urls.crl if issuer.urls else None)
        if not url:
            raise ValueError("a CRL needs its distribution point URL (issuer.urls or idp_url)")
        self._registry = registry
        self._issuer = issuer
        self._next_update = next_update
        self._idp_url = url
        self._seq = registry.last_event_seq() if since_seq is None else since_seq
        self._current: PublishedCrl | None = None
        self._issuer_key_id = issuer_key_id

    @property
    def current(self) -> PublishedCrl | None:
        return self._current

    @property
    def event_seq(self) -> int:
        """Events up to this seq have been reported by `poll` (and are in `current`)."""
        return self._seq

    def publish(self, now: datetime) -> PublishedCrl:
        """Build and sign a new CRL now, whatever the registry says changed."""
        seq = self._registry.last_event_seq()
        started = time.perf_counter()
        entries = self._registry.revoked_entries(now, self._issuer_key_id)
        number = self._registry.crl_number_next()
        crl = build_crl(
            self._issuer.cert,
            self._issuer.key,
            entries,
            number,
            now,
            self._next_update,
            self._idp_url,
        )
        published = PublishedCrl(
            crl=crl,
            der=crl.public_bytes(serialization.Encoding.DER),
            pem=crl.public_bytes(serialization.Encoding.PEM),
            number=number,
            entries=len(entries),
            event_seq=seq,
            build_seconds=time.perf_counter() - started,
        )
        self._current = published
        return published

    def _new_events(self) -> tuple[list[Event], int]:
        """Revocation, suspension and resumption events since the last poll, and the seq
        they (and the issuances between them, skipped) reach."""
        events: list[Event] = []
        seq = self._seq
        while True:
            page, seq = self._registry.revocation_events_since(seq, limit=_EVENT_PAGE)
            events.extend(page)
            if len(page) < _EVENT_PAGE:
                return events, seq

    def poll(self, now: datetime) -> CrlUpdate:
        """Rebuild if a revocation event arrived or the CRL is due for refresh.

        Every revocation, suspension and resumption event is reported exactly once (issuance
        events are skipped). The entries are read after the events, so the CRL reflects at
        least every event reported; a revocation landing in between is reported (and rebuilt
        for) by the next poll.
        """
        events, seq = self._new_events()
        changed = any(e.kind in CRL_EVENTS for e in events)
        stale = self._current is None or crl_needs_refresh(self._current.crl, now)
        self._seq = max(self._seq, seq)
        if changed or stale:
            return CrlUpdate(self.publish(now), events)
        return CrlUpdate(None, events)
