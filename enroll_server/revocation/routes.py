"""CRL and OCSP over plain HTTP: the handlers of /crl, /crl.pem, /ocsp and the root CRL.

What they serve is revocation.state.RevocationState; the CRL itself, revocation.publisher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import format_datetime

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.errors import UnsupportedMediaType
from enroll_server.home.config import ROOT_CRL_PATH
from enroll_server.pki.crl import crl_refresh_at
from enroll_server.pki.ocsp import OcspReply
from enroll_server.revocation.issuers import IssuerRevocation, crl_route_handler
from enroll_server.revocation.publisher import PublishedCrl
from enroll_server.revocation.state import RevocationState
from fleetpki.clock import utc_now

OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
CRL_TYPE = "application/pkix-crl"  # RFC 2585 section 4.2
# A single-certificate OCSP request is about 100 bytes; a signed one with its chain a few KiB.
MAX_OCSP_REQUEST = 16 * 1024
# How long an HTTP cache may keep a GET OCSP answer: short, revocations must show quickly.
OCSP_GET_MAX_AGE = timedelta(seconds=60)


class RootCrl:
    """The root CA's CRL as `load(now)` gives it (home.root.root_crl: the file, re-signed at
    half life when the root key is in the home), served at /root.crl; looked at again once the
    one in hand is due, or after `recheck` (an offline root: a ceremony replaces the file while
    serve runs). `load` giving None (no file, an external root's home): 404."""

    def __init__(
        self,
        load: Callable[[datetime], x509.CertificateRevocationList | None],
        clock: Callable[[], datetime] = utc_now,
        recheck: timedelta | None = None,
    ) -> None:
        self._load = load
        self._clock = clock
        self._recheck = recheck
        self.crl: x509.CertificateRevocationList | None = None
        self._der = b""
        self._refresh_at: datetime | None = None
        self._lock = asyncio.Lock()

    async def der(self) -> bytes:
        """The CRL, DER; b"" when there is none."""
        async with self._lock:
            now = self._clock()
            if self._refresh_at is None or now >= self._refresh_at:
                # Signing needs the root key, decrypted from its file: off the loop.
                crl = await asyncio.to_thread(self._load, now)
                self.crl = crl
                self._der = b"" if crl is None else crl.public_bytes(serialization.Encoding.DER)
                due = [now + self._recheck] if self._recheck is not None else []
                if crl is not None:
                    due.append(crl_refresh_at(crl))
                self._refresh_at = min(due) if due else None
            return self._der

    def reload(self) -> None:
        """Look at the file again at the next request (`fleetpki ca revoke-issuing` wrote it)."""
        self._refresh_at = None

    def routes(self) -> list[web.RouteDef]:
        async def get_root_crl(request: web.Request) -> web.Response:
            """The root CA's CRL, DER (the issuing CA certificate's CRL Distribution Point)."""
            der = await self.der()
            if not der:
                raise web.HTTPNotFound(text="no root CRL here\n")
            return web.Response(
                body=der, content_type=CRL_TYPE, headers={"Cache-Control": "no-cache"}
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


def revocation_routes(state: RevocationState | IssuerRevocation) -> list[web.RouteDef]:
    """GET /crl, GET /crl.pem, POST /ocsp, GET /ocsp/{b64}; also call `state.attach(app)`.

    With several issuing CAs (IssuerRevocation), also GET /crl/{id} and /crl/{id}.pem.
    """

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

    per_issuer = []
    if isinstance(state, IssuerRevocation):
        per_issuer = [web.get("/crl/{issuer}", crl_route_handler(state, _crl_response))]
    return [
        *per_issuer,
        web.get("/crl", get_crl),
        web.get("/crl.pem", get_crl_pem),
        web.post("/ocsp", post_ocsp),
        web.get("/ocsp/{request:.*}", get_ocsp),
    ]
