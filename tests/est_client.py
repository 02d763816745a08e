"""A tiny blocking HTTPS client for tests (stdlib http.client; real TLS, client certs)."""

from __future__ import annotations

import base64
import http.client
import ssl
from dataclasses import dataclass
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def request(
    url: str,
    ctx: ssl.SSLContext | None,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
) -> Reply:
    u = urlparse(url)
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(
            method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=headers or {}
        )
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    cred = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {cred}"}


def enroll_headers(user: str, password: str) -> dict[str, str]:
    return {**basic(user, password), "Content-Type": "application/pkcs10"}


def ask_ocsp(http_url: str, cert: x509.Certificate, issuer: x509.Certificate) -> ocsp.OCSPResponse:
    """POST /ocsp about `cert` (RFC 6960 A.1); asserts a 200 and returns the parsed response."""
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, issuer, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    answer = request(
        http_url + "/ocsp", None, "POST", der, {"Content-Type": "application/ocsp-request"}
    )
    assert answer.status == 200, (answer.status, answer.text)
    return ocsp.load_der_ocsp_response(answer.body)
