"""EST message bodies: base64 PKCS#10 in, base64 PKCS#7 certs-only out (RFC 7030 4.2, RFC 8951)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from enroll_server.pki.der import encode as der_element

CSR_CONTENT_TYPE = "application/pkcs10"
CERTS_ONLY_CONTENT_TYPE = "application/pkcs7-mime; smime-type=certs-only"
CACERTS_CONTENT_TYPE = "application/pkcs7-mime"
CSRATTRS_CONTENT_TYPE = "application/csrattrs"

_WS = re.compile(rb"\s+")
_PEM_CSR = re.compile(
    rb"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----(.*?)-----END (?:NEW )?CERTIFICATE REQUEST-----",
    re.S,
)


class BadEstBody(ValueError):
    """A request body that is not base64 DER as RFC 7030 requires; `reason` is for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_base64_body(body: bytes, what: str = "PKCS#10 request") -> bytes:
    """Decode the base64 body of simpleenroll/simplereenroll.

    RFC 8951 section 3 settles that EST bodies are base64 whatever Content-Transfer-Encoding
    says, and that line breaks may appear; a PEM-armoured CSR is accepted too, since openssl
    users paste one.
    """
    # The common case first, in one C call: a single run of base64 with nothing around it
    # (what EST clients send). Anything else (line breaks, PEM armour, garbage) takes the
    # general path below, which also words the error.
    try:
        der = binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error:
        pass
    else:
        if der:
            return der
    m = _PEM_CSR.search(body)
    if m:
        body = m.group(1)
    compact = _WS.sub(b"", body)
    if not compact:
        raise BadEstBody(f"empty body: expected a base64-encoded {what}")
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadEstBody(f"body is not valid base64 (expected a base64-encoded {what})") from exc
    if not der:
        raise BadEstBody(f"empty body: expected a base64-encoded {what}")
    return der


def _b64_lines(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + b"\n"


# The fixed parts of a degenerate SignedData (RFC 5652 5.1; RFC 7030 4.1.3 "certs-only"):
# version 1, no digest algorithms, encapsulated content type id-data with no content,
# no signers. Only the certificates field varies.
_OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # 1.2.840.113549.1.7.2
_SD_HEAD = bytes.fromhex("0201013100300b06092a864886f70d010701")
_SD_TAIL = bytes.fromhex("3100")


def certs_only_der(cert_ders: Sequence[bytes]) -> bytes:
    """DER of a degenerate (certs-only) PKCS#7 SignedData holding these DER certificates.

    Built directly from the certificates' DER: the server already holds it, so re-parsing
    and re-serializing each certificate (what pkcs7.serialize_certificates does) is wasted
    work per enrollment. The certificates field is a SET OF, so DER (X.690 11.6) orders the
    elements by their encodings; the output is byte-identical to cryptography's.
    """
    certs = der_element(0xA0, b"".join(sorted(cert_ders)))  # [0] IMPLICIT SET OF Certificate
    signed_data = der_element(0x30, _SD_HEAD + certs + _SD_TAIL)
    return der_element(0x30, _OID_SIGNED_DATA + der_element(0xA0, signed_data))


def encode_certs_only_der(cert_ders: Sequence[bytes]) -> bytes:
    """certs_only_der, base64 with line breaks: the body of an EST certificate response."""
    return _b64_lines(certs_only_der(cert_ders))


def encode_certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """A degenerate (certs-only) PKCS#7 SignedData, base64 with line breaks (RFC 7030 4.1.3)."""
    return encode_certs_only_der([c.public_bytes(serialization.Encoding.DER) for c in certs])


def decode_certs_only(body: bytes) -> list[x509.Certificate]:
    """Client side / tests: the certificates of a base64 certs-only PKCS#7."""
    der = decode_base64_body(body, "PKCS#7 certs-only message")
    try:
        return pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as exc:
        raise BadEstBody("body is not a DER PKCS#7 certs-only message") from exc


def encode_der_b64(der: bytes) -> bytes:
    return _b64_lines(der)
