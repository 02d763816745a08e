"""EST handlers (RFC 7030 4.1-4.5) on aiohttp: decode, call the service, encode. Nothing more.

The two enrollment POSTs are normally served by the lean front end (est/front.py); these
routes serve what it hands over (chunked bodies, Expect: 100-continue) and the GETs.
"""

from __future__ import annotations

from datetime import datetime

from aiohttp import web
from cryptography import x509

from enroll_server.enrollment.commit_queue import CommitFailed, registry_busy
from enroll_server.enrollment.service import Authorization, Enrollment
from enroll_server.est.csrattrs import csr_attrs_der
from enroll_server.est.operations import (
    authorize_simpleenroll,
    authorize_simplereenroll,
    check_content_type,
    csr_of,
    peer_certificate_of,
)
from enroll_server.est.wire import (
    CACERTS_CONTENT_TYPE,
    CERTS_ONLY_CONTENT_TYPE,
    CSRATTRS_CONTENT_TYPE,
    encode_certs_only,
    encode_certs_only_der,
    encode_der_b64,
)
from enroll_server.pki.csr_policy import DEFAULT_KEY_TYPES
from enroll_server.web.state import APP_STATE, AppState

EST_PREFIX = "/.well-known/est"


def _state(request: web.Request) -> AppState:
    return request.app[APP_STATE]


def _b64_response(body: bytes, content_type: str) -> web.Response:
    # RFC 8951 3: the body is base64 regardless; the header is kept for RFC 7030-era clients.
    return web.Response(
        body=body, headers={"Content-Type": content_type, "Content-Transfer-Encoding": "base64"}
    )


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The TLS client certificate, already chain-verified by the TLS layer (CERT_OPTIONAL)."""
    transport = request.transport
    return peer_certificate_of(transport.get_extra_info("ssl_object") if transport else None)


async def _csr_body(request: web.Request) -> bytes:
    check_content_type(request.content_type)  # UnsupportedMediaType: 415 by the error table
    return csr_of(await request.read())


async def cacerts(request: web.Request) -> web.Response:
    st = _state(request)
    return _b64_response(encode_certs_only(st.cacerts()), CACERTS_CONTENT_TYPE)


async def csrattrs(request: web.Request) -> web.Response:
    return _b64_response(encode_der_b64(csr_attrs_der(DEFAULT_KEY_TYPES)), CSRATTRS_CONTENT_TYPE)


async def _enroll(st: AppState, csr: bytes, auth: Authorization, now: datetime) -> Enrollment:
    outcome = st.service.issue(csr, auth, now)
    if isinstance(outcome, Enrollment):
        return outcome
    try:
        refused = await st.commits.record(outcome.issuance)
    except CommitFailed as exc:
        if exc.busy:
            raise registry_busy(exc) from exc
        raise
    return st.service.settle(outcome, refused)


async def simpleenroll(request: web.Request) -> web.Response:
    st = _state(request)
    now = st.clock()
    auth = authorize_simpleenroll(
        st,
        request.headers.get("Authorization"),
        request.remote or "?",
        lambda: peer_certificate(request),
        now,
    )
    result = await _enroll(st, await _csr_body(request), auth, now)
    st.metrics.enrollments.inc("simpleenroll_ok")
    return _b64_response(encode_certs_only_der(result.chain_der), CERTS_ONLY_CONTENT_TYPE)


async def simplereenroll(request: web.Request) -> web.Response:
    st = _state(request)
    now = st.clock()
    auth = authorize_simplereenroll(st, peer_certificate(request), now)
    result = await _enroll(st, await _csr_body(request), auth, now)
    st.metrics.enrollments.inc("simplereenroll_ok")
    return _b64_response(encode_certs_only_der(result.chain_der), CERTS_ONLY_CONTENT_TYPE)


def est_routes() -> list[web.RouteDef]:
    return [
        web.get(f"{EST_PREFIX}/cacerts", cacerts),
        web.get(f"{EST_PREFIX}/csrattrs", csrattrs),
        web.post(f"{EST_PREFIX}/simpleenroll", simpleenroll),
        web.post(f"{EST_PREFIX}/simplereenroll", simplereenroll),
    ]
