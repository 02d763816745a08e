"""The revocation state: the CRL kept current by a refresh task, and the OCSP responder.

What the CRL and OCSP handlers (revocation.routes) serve; no HTTP here (aiohttp is named
for typing only: `attach` ties the refresh task to an app's lifetime).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cryptography.x509 import ocsp

from enroll_server.pki.ca import Issuer
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.ocsp import (
    DEFAULT_RESPONSE_VALIDITY,
    DEFAULT_SIGNER_VALIDITY,
    CertStatusInfo,
    OcspReply,
    OcspResponder,
    build_ocsp_signer_certificate,
    respond,
    respond_get,
    unsuccessful,
)
from enroll_server.pki.signer import SignerUnavailable, in_token
from enroll_server.registry.errors import RegistryBusy
from enroll_server.registry.models import CertificateRecord, CertStatus
from enroll_server.revocation.publisher import (
    CrlPublisher,
    CrlUpdate,
    PublishedCrl,
    RevocationSource,
)
from fleetpki.clock import utc_now

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("fleetpki.revocation")

DEFAULT_POLL_INTERVAL = 0.5


def status_of(record: CertificateRecord | None) -> CertStatusInfo:
    """The OCSP status of a registry record (RFC 6960 2.2).

    A superseded certificate (the fallback of a renewal not yet used) is still good; once the
    renewal is used it is revoked with reason superseded (RFC 5280 5.3.1). An on-hold one is
    "revoked" with reason certificateHold (RFC 6960 2.2 allows exactly this for temporary
    holds) and returns to good on resume.
    """
    if record is None:
        return CertStatusInfo.unknown()
    if record.status in (CertStatus.ACTIVE, CertStatus.SUPERSEDED):
        return CertStatusInfo.good()
    revoked_at = record.revoked_at or record.issued_at
    if record.status is CertStatus.ON_HOLD:
        return CertStatusInfo.revoked(revoked_at, "certificateHold")
    return CertStatusInfo.revoked(revoked_at, record.revocation_reason)


@dataclass
class OcspSignerPolicy:
    """Whether responses are signed by the CA itself or by a short-lived delegated signer.

    A delegated signer (RFC 6960 4.2.2.2) gets a fresh key in memory only, never on disk, and is
    replaced at half its lifetime; its certificate carries id-pkix-ocsp-nocheck.
    """

    delegated: bool = False
    signer_validity: timedelta = DEFAULT_SIGNER_VALIDITY
    response_validity: timedelta = DEFAULT_RESPONSE_VALIDITY
    key_type: KeyType = KeyType.EC_P256


@dataclass
class RevocationState:
    """What the CRL and OCSP handlers serve, and the task that keeps it current."""

    publisher: CrlPublisher
    issuer: Issuer
    lookup: Callable[[int], CertStatusInfo]
    signer_policy: OcspSignerPolicy = field(default_factory=OcspSignerPolicy)
    clock: Callable[[], datetime] = utc_now
    poll_interval: float = DEFAULT_POLL_INTERVAL
    outcomes: Counter[str] = field(default_factory=Counter)
    _responder: OcspResponder | None = field(default=None, init=False, repr=False)
    _signer_renew_at: datetime | None = field(default=None, init=False, repr=False)
    _wake: asyncio.Event | None = field(default=None, init=False, repr=False)
    _on_crl: list[Callable[[PublishedCrl], object]] = field(default_factory=list, repr=False)

    @classmethod
    def from_registry(
        cls,
        registry: RevocationSource,
        issuer: Issuer,
        *,
        next_update: timedelta = timedelta(hours=24),
        signer_policy: OcspSignerPolicy | None = None,
        clock: Callable[[], datetime] = utc_now,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        issuer_key_id: str | None = None,
    ) -> RevocationState:
        """The usual wiring: CRL from the registry, OCSP status from registry records.

        OCSP responses are signed by the issuing CA, unless its key is in a token: then by a
        delegated responder (RFC 6960 4.2.2.2) whose key lives in memory only and whose
        short-lived certificate the token signs at each renewal. A token signature per OCSP
        answer would tie every relying party's status check to the token (its latency, its
        sessions, its being there), for no gain: the responder certificate says exactly
        which CA delegated it, for how long, and carries id-pkix-ocsp-nocheck.

        `issuer_key_id`: this issuing CA's own certificates only (one of several after a
        rollover): its CRL lists only them, and OCSP says "unknown" for another issuer's serial
        (RFC 6960 2.2: the responder does not know it as this CertID's issuer's).
        """
        publisher = CrlPublisher(
            registry, issuer, next_update=next_update, issuer_key_id=issuer_key_id
        )

        def lookup(serial: int) -> CertStatusInfo:
            record = registry.get_certificate(serial)
            if record is not None and issuer_key_id is not None:
                if record.issuer_key_id not in (None, issuer_key_id):
                    record = None
            return status_of(record)

        return cls(
            publisher=publisher,
            issuer=issuer,
            lookup=lookup,
            signer_policy=signer_policy or OcspSignerPolicy(delegated=in_token(issuer.key)),
            clock=clock,
            poll_interval=poll_interval,
        )

    # -------------------------------------------------------------- CRL

    def crl(self) -> PublishedCrl:
        """The current CRL, built on first use."""
        return self.publisher.current or self.publisher.publish(self.clock())

    def on_crl(self, hook: Callable[[PublishedCrl], object]) -> None:
        """Call `hook` with every newly published CRL (metrics, a file mirror, ...)."""
        self._on_crl.append(hook)

    def changed(self) -> None:
        """Wake the refresh task now (for revocations made in this process)."""
        if self._wake is not None:
            self._wake.set()

    def refresh(self) -> CrlUpdate:
        """One synchronous poll of the registry; rebuilds the CRL if needed."""
        update = self.publisher.poll(self.clock())
        if update.published is not None:
            log.info(
                "CRL #%d published: %d entries in %.3f s",
                update.published.number,
                update.published.entries,
                update.published.build_seconds,
            )
            for hook in self._on_crl:
                hook(update.published)
        return update

    async def run(self) -> None:
        """Poll the registry until cancelled; a failing round is logged and retried."""
        self._wake = asyncio.Event()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
            self._wake.clear()
            try:
                # A 100k-entry CRL takes about a second to sign: keep it off the event loop.
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.exception("CRL refresh failed; still serving CRL #%s", self._number())

    def _number(self) -> int | None:
        current = self.publisher.current
        return None if current is None else current.number

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(self.crl)
        task = asyncio.create_task(self.run(), name="fleetpki-crl-refresh")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def attach(self, app: web.Application) -> None:
        """Build the first CRL when `app` starts and keep it fresh while `app` runs."""
        app.cleanup_ctx.append(self._lifecycle)

    # -------------------------------------------------------------- OCSP

    def responder(self, now: datetime) -> OcspResponder:
        """The OCSP responder, with its delegated signer renewed at half life if used."""
        policy = self.signer_policy
        if self._responder is not None and (
            self._signer_renew_at is None or now < self._signer_renew_at
        ):
            return self._responder
        if not policy.delegated:
            self._responder = OcspResponder.by_issuer(self.issuer, policy.response_validity)
            return self._responder
        key = generate_key(policy.key_type)
        cert = build_ocsp_signer_certificate(
            key.public_key(), self.issuer, now, policy.signer_validity
        )
        self._responder = OcspResponder(self.issuer.cert, cert, key, policy.response_validity)
        self._signer_renew_at = now + (cert.not_valid_after_utc - now) / 2
        log.info("OCSP signer %x valid until %s", cert.serial_number, cert.not_valid_after_utc)
        return self._responder

    def answer(self, request_der: bytes) -> OcspReply:
        now = self.clock()
        return self._guarded(lambda: respond(request_der, self.responder(now), self.lookup, now))

    def answer_get(self, encoded: str) -> OcspReply:
        now = self.clock()
        return self._guarded(lambda: respond_get(encoded, self.responder(now), self.lookup, now))

    def _guarded(self, work: Callable[[], OcspReply]) -> OcspReply:
        try:
            reply = work()
        except RegistryBusy as exc:
            # The registry locked or unreachable (PostgreSQL restarting): RFC 6960 2.3
            # tryLater, which a client retries, rather than internalError.
            log.warning("OCSP: %s", exc)
            reply = OcspReply(unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER), "tryLater")
        except SignerUnavailable as exc:
            # The CA key's token is away (removed, session lost): tryLater too, it may return.
            log.warning("OCSP: %s", exc)
            reply = OcspReply(unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER), "tryLater")
        except Exception:
            # A registry or signing failure is ours, not the client's: internalError
            # (RFC 6960 2.3), never an HTTP 500 an OCSP client cannot parse.
            log.exception("OCSP responder failed")
            reply = OcspReply(unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR), "internalError")
        self.outcomes[reply.outcome] += 1
        return reply
