"""The two EST enrollment operations, apart from any HTTP framework.

Both the lean front end (est/front.py, the hot path) and the aiohttp routes (est/routes.py,
for what the front end hands over) call these, so the rules live once: who may enroll
(RFC 7030 3.2.3, 3.3.2), which body is accepted (RFC 7030 4.2.1, RFC 8951 3), what counts.
"""

from __future__ import annotations

import base64
import binascii
import ssl
from collections.abc import Callable
from datetime import datetime

from cryptography import x509

from enroll_server.enrollment.service import Authorization
from enroll_server.errors import (
    AuthenticationFailed,
    BadRequest,
    Forbidden,
    UnsupportedMediaType,
)
from enroll_server.est.wire import CSR_CONTENT_TYPE, BadEstBody, decode_base64_body
from enroll_server.web.state import AppState

SIMPLEENROLL = "simpleenroll"
SIMPLEREENROLL = "simplereenroll"
# RFC 7030 4.2.1: the request is application/pkcs10. A request without the header (curl
# --data-binary without -H) is taken as octet-stream and accepted; nothing else is.
ACCEPTED_CSR_TYPES = frozenset({CSR_CONTENT_TYPE, "application/octet-stream"})


def check_content_type(content_type: str) -> None:
    """`content_type` is the media type alone, lowercase, without parameters."""
    if content_type not in ACCEPTED_CSR_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type} is not accepted; send {CSR_CONTENT_TYPE}"
        )


def media_type(header: str | None) -> str:
    """The media type of a Content-Type header value, lowercase; octet-stream when absent."""
    if not header:
        return "application/octet-stream"
    return header.split(";", 1)[0].strip().lower()


def decode_basic(header: str) -> tuple[str, str] | None:
    """(user id, password) of an HTTP Basic Authorization header (RFC 7617); None if another
    scheme. We announce charset="UTF-8" (RFC 7617 2.1), so the credentials decode as UTF-8."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("malformed Authorization header: bad base64") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise AuthenticationFailed("malformed Authorization header: no ':' in credentials")
    return user, password


def csr_of(body: bytes) -> bytes:
    """The DER CSR of a simpleenroll/simplereenroll body (base64, RFC 8951 3)."""
    try:
        return decode_base64_body(body)
    except BadEstBody as exc:
        raise BadRequest(exc.reason) from exc


def authorize_simpleenroll(
    st: AppState,
    authorization: str | None,
    source: str,
    peer_certificate: Callable[[], x509.Certificate | None],
    now: datetime,
) -> Authorization:
    """First enrollment: HTTP Basic (device id + one-time token) or an IDevID over mTLS.

    The token is checked first: a correct one always enrolls. A failure is counted per
    source network and device id and answered 429 once either has too many (Throttle).
    """
    creds = decode_basic(authorization) if authorization else None
    if creds is not None:
        login, password = creds
        try:
            return st.service.authorize_token(login, password, now)
        except AuthenticationFailed:
            throttled = st.throttle.failed(source, login, now)
            if throttled is not None:
                raise throttled from None
            raise
    cert = peer_certificate()
    if cert is not None:
        return st.service.authorize_bootstrap_certificate(cert, now)
    raise AuthenticationFailed("simpleenroll needs HTTP Basic (device id + enrollment token)")


def authorize_simplereenroll(
    st: AppState, peer_certificate: x509.Certificate | None, now: datetime
) -> Authorization:
    """Re-enrollment: the current certificate, presented in the TLS handshake."""
    if peer_certificate is None:
        raise Forbidden(
            "simplereenroll requires TLS client authentication with the current certificate"
        )
    return st.service.authorize_certificate(peer_certificate, now)


def peer_certificate_of(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
) -> x509.Certificate | None:
    """The TLS client certificate, already chain-verified by the TLS layer (CERT_OPTIONAL)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None
