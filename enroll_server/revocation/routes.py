"""CRL and OCSP over plain HTTP: the revocation state the handlers serve, and the handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import format_datetime

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from enroll_server.errors import UnsupportedMediaType
from enroll_server.home.config import ROOT_CRL_PATH
from enroll_server.pki.ca import Issuer
from enroll_server.pki.crl import crl_refresh_at
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
from enroll_server.registry.errors import RegistryBusy
from enroll_server.registry.models import CertificateRecord, CertStatus
from enroll_server.revocation.publisher import (
    CrlPublisher,
    CrlUpdate,
    PublishedCrl,
    RevocationSource,
    utc_now,
)

log = logging.getLogger("fleetpki.revocation")

OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
CRL_TYPE = "application/pkix-crl"  # RFC 2585 section 4.2
# A single-certificate OCSP request is about 100 bytes; a signed one with its chain a few KiB.
MAX_OCSP_REQUEST = 16 * 1024
# How long an HTTP cache may keep a GET OCSP answer: short, revocations must show quickly.
OCSP_GET_MAX_AGE = timedelta(seconds=60)
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
    ) -> RevocationState:
        """The usual wiring: CRL from the registry, OCSP status from registry records."""
        publisher = CrlPublisher(registry, issuer, next_update=next_update)
        return cls(
            publisher=publisher,
            issuer=issuer,
            lookup=lambda serial: status_of(registry.get_certificate(serial)),
            signer_policy=signer_policy or OcspSignerPolicy(),
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
        except Exception:
            # A registry or signing failure is ours, not the client's: internalError
            # (RFC 6960 2.3), never an HTTP 500 an OCSP client cannot parse.
            log.exception("OCSP responder failed")
            reply = OcspReply(unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR), "internalError")
        self.outcomes[reply.outcome] += 1
        return reply


class RootCrl:
    """The root CA's CRL as `load(now)` gives it (home.root_crl: the file, re-signed at half
    life), served at /root.crl; looked at again only once the one in hand is due."""

    def __init__(
        self,
        load: Callable[[datetime], x509.CertificateRevocationList],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._load = load
        self._clock = clock
        self._der = b""
        self._refresh_at: datetime | None = None
        self._lock = asyncio.Lock()

    async def der(self) -> bytes:
        async with self._lock:
            now = self._clock()
            if self._refresh_at is None or now >= self._refresh_at:
                # Signing needs the root key, decrypted from its file: off the loop.
                crl = await asyncio.to_thread(self._load, now)
                self._der = crl.public_bytes(serialization.Encoding.DER)
                self._refresh_at = crl_refresh_at(crl)
            return self._der

    def routes(self) -> list[web.RouteDef]:
        async def get_root_crl(request: web.Request) -> web.Response:
            """The root CA's CRL, DER (the issuing CA certificate's CRL Distribution Point)."""
            return web.Response(
                body=await self.der(), content_type=CRL_TYPE, headers={"Cache-Control": "no-cache"}
            )

        return [web.get(f"/{ROOT_CRL_PATH}", get_root_crl)]


def _crl_headers(published: PublishedCrl) -> dict[str, str]:
    headers = {
        "ETag": published.etag,
        "Last-Modified": format_datetime(published.this_update, usegmt=True),
        # Revalidate every time (cheap with the ETag): a cached old CRL would hide revocations.
        "Cache-Control": "no-cache",
    }
    if published.next_update is not None:
        headers["Expires"] = format_datetime(published.next_update, usegmt=True)
    return headers


def _crl_response(request: web.Request, published: PublishedCrl, pem: bool) -> web.Response:
    headers = _crl_headers(published)
    if published.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    if pem:
        return web.Response(
            body=published.pem, content_type="application/x-pem-file", headers=headers
        )
    return web.Response(body=published.der, content_type=CRL_TYPE, headers=headers)


def _ocsp_response(reply: OcspReply, cacheable: bool) -> web.Response:
    headers = {}
    if cacheable and reply.next_update is not None:
        # RFC 5019 6.2: caching headers for GET; bounded so revocations show quickly.
        headers["Cache-Control"] = (
            f"max-age={int(OCSP_GET_MAX_AGE.total_seconds())}, public, no-transform"
        )
    # OCSP errors travel inside a 200 (RFC 6960 A.1): clients parse the OCSPResponse status.
    return web.Response(body=reply.der, content_type=OCSP_RESPONSE_TYPE, headers=headers)


def _get_path_tail(request: web.Request) -> str:
    # The raw (undecoded) path: base64 may contain '/' and clients differ on escaping it, so
    # take everything after the prefix and let the decoder un-escape it (RFC 6960 A.1).
    raw = request.raw_path.split("?", 1)[0]
    prefix = "/ocsp/"
    return raw[len(prefix) :] if raw.startswith(prefix) else ""


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole request body (to its Content-Length, or its last chunk), None past `limit`.

    One `read(n)` returns what has arrived so far, not n bytes: a body split across TCP
    segments would otherwise be cut at the first one.
    """
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)


def revocation_routes(state: RevocationState) -> list[web.RouteDef]:
    """GET /crl, GET /crl.pem, POST /ocsp, GET /ocsp/{b64}; also call `state.attach(app)`."""

    async def get_crl(request: web.Request) -> web.Response:
        """The current CRL, DER (the CRL Distribution Point of RFC 5280 4.2.1.13)."""
        return _crl_response(request, state.crl(), pem=False)

    async def get_crl_pem(request: web.Request) -> web.Response:
        """The same CRL, PEM (what mosquitto's crlfile and nginx load)."""
        return _crl_response(request, state.crl(), pem=True)

    async def post_ocsp(request: web.Request) -> web.Response:
        """DER OCSPRequest in, DER OCSPResponse out (RFC 6960 A.1)."""
        # RFC 6960 A.1: "Content-Type: application/ocsp-request". Anything else is not an OCSP
        # client (an HTML form, a stray script): a plain 415 saying what to send.
        if request.content_type != OCSP_REQUEST_TYPE:
            raise UnsupportedMediaType(
                f"Content-Type {request.content_type} is not accepted; send {OCSP_REQUEST_TYPE}"
            )
        length = request.content_length
        if length is not None and length > MAX_OCSP_REQUEST:
            return _ocsp_response(state.answer(b""), cacheable=False)  # malformedRequest
        body = await _read_body(request, MAX_OCSP_REQUEST)
        # An oversized body is answered as malformedRequest.
        return _ocsp_response(state.answer(body or b""), cacheable=False)

    async def get_ocsp(request: web.Request) -> web.Response:
        """GET /ocsp/{url-encoded base64 of the DER request} (RFC 6960 A.1)."""
        reply = state.answer_get(_get_path_tail(request))
        return _ocsp_response(reply, cacheable=reply.outcome in ("good", "revoked", "unknown"))

    return [
        web.get("/crl", get_crl),
        web.get("/crl.pem", get_crl_pem),
        web.post("/ocsp", post_ocsp),
        web.get("/ocsp/{request:.*}", get_ocsp),
    ]
