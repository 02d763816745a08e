"""Fuzz the OCSP responder (enroll_server/pki/ocsp.py) through what its HTTP handlers call.

By the first byte: a POST body (DER OCSPRequest), the path tail of a GET
(/ocsp/{url-encoded base64}, as revocation_http hands it over), or a well-formed request for
our issuer whose serial and nonce come from the input (edge serials, nonce lengths). Every
input must get an OCSPResponse that parses; `respond` must never raise (the handler would answer
internalError for what is the client's mistake), and a successful answer echoes the asked
serial. A lookup that knows good, revoked and on-hold serials stands in for the registry.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    from enroll_server.pki.ocsp import (
        CertStatusInfo,
        OcspResponder,
        cert_id_hashes,
        respond,
        respond_get,
    )
    from tests.pki_helpers import make_ca, ocsp_request_for_negative_serial

CA = make_ca()
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
RESPONDER = OcspResponder.by_issuer(CA.issuing)
HASHES = cert_id_hashes(CA.issuing.cert, hashes.SHA1())


def lookup(serial: int) -> CertStatusInfo:
    kind = serial % 4
    if kind == 0:
        return CertStatusInfo.good()
    if kind == 1:
        return CertStatusInfo.revoked(NOW - timedelta(hours=1), "keyCompromise")
    if kind == 2:
        return CertStatusInfo.revoked(NOW - timedelta(hours=1), "certificateHold")
    return CertStatusInfo.unknown()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode = data[0] % 3
    if mode == 2:
        serial = int.from_bytes(data[1:21], "big")
        builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            *HASHES, max(serial, 1), hashes.SHA1()
        )
        if len(data) > 21:
            builder = builder.add_extension(x509.OCSPNonce(data[21:]), critical=False)
        reply = respond(
            builder.build().public_bytes(serialization.Encoding.DER), RESPONDER, lookup, NOW
        )
    elif mode == 1:
        reply = respond_get(data[1:].decode("latin-1"), RESPONDER, lookup, NOW)
    else:
        reply = respond(data[1:], RESPONDER, lookup, NOW)
    parsed = ocsp.load_der_ocsp_response(reply.der)
    if parsed.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL:
        assert parsed.serial_number == reply.serial, (parsed.serial_number, reply.serial)
        assert reply.outcome in ("good", "revoked", "unknown"), reply.outcome
    else:
        assert reply.outcome in ("malformedRequest", "unauthorized"), reply.outcome


def seeds() -> list[bytes]:
    out = []
    cert, _ = CA.device_cert("dev-0001")
    for algorithm in (hashes.SHA1(), hashes.SHA256()):
        for nonce in (None, b"n" * 16):
            builder = ocsp.OCSPRequestBuilder().add_certificate(cert, CA.issuing.cert, algorithm)
            if nonce:
                builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
            der = builder.build().public_bytes(serialization.Encoding.DER)
            out += [b"\x00" + der, b"\x01" + base64.b64encode(der)]
            out.append(b"\x01" + base64.urlsafe_b64encode(der).rstrip(b"="))
    out.append(b"\x00" + ocsp_request_for_negative_serial(CA.issuing.cert))
    out += [b"\x02" + bytes(19) + b"\x05", b"\x02" + b"\xff" * 20 + b"n" * 32]
    return out


if __name__ == "__main__":
    _harness.main("ocsp", test_one_input, seeds)
