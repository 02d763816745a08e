"""EST handlers (RFC 7030 4.1-4.5): decode, call one service method, encode. Nothing more."""

from __future__ import annotations

from aiohttp import BasicAuth, web
from cryptography import x509

from enroll_server.errors import AuthenticationFailed, BadRequest, Forbidden
from enroll_server.est.csrattrs import csr_attrs_der
from enroll_server.est.wire import (
    CACERTS_CONTENT_TYPE,
    CERTS_ONLY_CONTENT_TYPE,
    CSR_CONTENT_TYPE,
    CSRATTRS_CONTENT_TYPE,
    BadEstBody,
    decode_base64_body,
    encode_certs_only,
    encode_certs_only_der,
    encode_der_b64,
)
from enroll_server.pki.csr_policy import DEFAULT_KEY_TYPES
from enroll_server.state import APP_STATE, AppState

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
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


async def _csr_body(request: web.Request) -> bytes:
    ctype = request.content_type
    # RFC 7030 4.2.1: the request is application/pkcs10. aiohttp reports a missing header as
    # application/octet-stream; accept that (curl --data-binary without -H) but nothing else.
    if ctype not in (CSR_CONTENT_TYPE, "application/octet-stream"):
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Type {ctype} is not accepted; send {CSR_CONTENT_TYPE}\n"
        )
    body = await request.read()
    try:
        return decode_base64_body(body)
    except BadEstBody as exc:
        raise BadRequest(exc.reason) from exc


async def cacerts(request: web.Request) -> web.Response:
    st = _state(request)
    return _b64_response(encode_certs_only(st.ca_chain), CACERTS_CONTENT_TYPE)


async def csrattrs(request: web.Request) -> web.Response:
    return _b64_response(encode_der_b64(csr_attrs_der(DEFAULT_KEY_TYPES)), CSRATTRS_CONTENT_TYPE)


def _basic(request: web.Request) -> BasicAuth | None:
    header = request.headers.get("Authorization")
    if not header:
        return None
    try:
        return BasicAuth.decode(header)
    except ValueError as exc:
        raise AuthenticationFailed(f"malformed Authorization header: {exc}") from None


async def simpleenroll(request: web.Request) -> web.Response:
    st = _state(request)
    now = st.clock()
    creds = _basic(request)
    if creds is not None:
        source = request.remote or "?"
        st.throttle.check(source, creds.login, now)
        try:
            auth = st.service.authorize_token(creds.login, creds.password, now)
        except AuthenticationFailed:
            st.throttle.failed(source, creds.login, now)
            raise
    elif (cert := peer_certificate(request)) is not None:
        auth = st.service.authorize_bootstrap_certificate(cert, now)
    else:
        raise AuthenticationFailed("simpleenroll needs HTTP Basic (device id + enrollment token)")
    csr = await _csr_body(request)
    result = st.service.enroll(csr, auth, now)
    st.metrics.enrollments.inc("simpleenroll_ok")
    return _b64_response(encode_certs_only_der(result.chain_der), CERTS_ONLY_CONTENT_TYPE)


async def simplereenroll(request: web.Request) -> web.Response:
    st = _state(request)
    now = st.clock()
    cert = peer_certificate(request)
    if cert is None:
        raise Forbidden(
            "simplereenroll requires TLS client authentication with the current certificate"
        )
    auth = st.service.authorize_certificate(cert, now)
    csr = await _csr_body(request)
    result = st.service.enroll(csr, auth, now)
    st.metrics.enrollments.inc("simplereenroll_ok")
    return _b64_response(encode_certs_only_der(result.chain_der), CERTS_ONLY_CONTENT_TYPE)


def est_routes() -> list[web.RouteDef]:
    return [
        web.get(f"{EST_PREFIX}/cacerts", cacerts),
        web.get(f"{EST_PREFIX}/csrattrs", csrattrs),
        web.post(f"{EST_PREFIX}/simpleenroll", simpleenroll),
        web.post(f"{EST_PREFIX}/simplereenroll", simplereenroll),
    ]
