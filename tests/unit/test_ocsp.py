"""OCSP responding: statuses, nonce, validity, signer forms and every kind of bad input."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from enroll_server.pki.keys import KeyType, PrivateKey, generate_key
from enroll_server.pki.ocsp import (
    BadOcspSigner,
    CertStatusInfo,
    MalformedOcspRequest,
    OcspResponder,
    build_ocsp_signer_certificate,
    cert_id_hashes,
    decode_get_request,
    respond,
    respond_get,
)
from tests.pki_helpers import MemoryCa, make_ca, ocsp_request_for_negative_serial

NOW = datetime.now(UTC).replace(microsecond=0)
REVOKED_AT = NOW - timedelta(hours=2)
Status = ocsp.OCSPCertStatus


def _der_request(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    algorithm: hashes.HashAlgorithm | None = None,
    nonce: bytes | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


class Table:
    """The registry's answer for a few serials (a plain dict; not a mock of anything)."""

    def __init__(self) -> None:
        self.rows: dict[int, CertStatusInfo] = {}
        self.asked: list[int] = []

    def __call__(self, serial: int) -> CertStatusInfo:
        self.asked.append(serial)
        return self.rows.get(serial, CertStatusInfo.unknown())


@pytest.fixture
def table() -> Table:
    return Table()


def _verify_signature(resp: ocsp.OCSPResponse, key: PrivateKey) -> None:
    pub = key.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        assert resp.signature_hash_algorithm is not None
        pub.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(resp.signature, resp.tbs_response_bytes)
    else:
        from cryptography.hazmat.primitives.asymmetric import padding

        assert isinstance(pub, rsa.RSAPublicKey)
        assert resp.signature_hash_algorithm is not None
        pub.verify(
            resp.signature,
            resp.tbs_response_bytes,
            padding.PKCS1v15(),
            resp.signature_hash_algorithm,
        )


def test_good_response_is_signed_by_the_issuer_with_validity_and_nonce(
    ca: MemoryCa, table: Table
) -> None:
    cert, _ = ca.device_cert("ocsp-good-1")
    table.rows[cert.serial_number] = CertStatusInfo.good()
    nonce = os.urandom(32)
    responder = OcspResponder.by_issuer(ca.issuing)

    reply = respond(_der_request(cert, ca.issuing.cert, nonce=nonce), responder, table, NOW)

    assert reply.outcome == "good"
    assert table.asked == [cert.serial_number]
    resp = ocsp.load_der_ocsp_response(reply.der)
    assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status is Status.GOOD
    assert resp.serial_number == cert.serial_number
    assert resp.this_update_utc == NOW
    assert resp.next_update_utc == NOW + responder.validity
    assert reply.next_update == NOW + responder.validity
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    ski = ca.issuing.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert resp.responder_key_hash == ski.digest  # byKey responder id
    assert resp.certificates == []  # the CA signs itself: nothing to ship
    _verify_signature(resp, ca.issuing.key)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("keyCompromise", x509.ReasonFlags.key_compromise),
        ("certificateHold", x509.ReasonFlags.certificate_hold),
        ("unspecified", None),
        (None, None),
    ],
)
def test_revoked_response_carries_time_and_reason(
    ca: MemoryCa, table: Table, reason: str | None, expected: x509.ReasonFlags | None
) -> None:
    cert, _ = ca.device_cert("ocsp-revoked-1")
    table.rows[cert.serial_number] = CertStatusInfo.revoked(REVOKED_AT, reason)
    reply = respond(
        _der_request(cert, ca.issuing.cert), OcspResponder.by_issuer(ca.issuing), table, NOW
    )
    assert reply.outcome == "revoked"
    resp = ocsp.load_der_ocsp_response(reply.der)
    assert resp.certificate_status is Status.REVOKED
    assert resp.revocation_time_utc == REVOKED_AT
    assert resp.revocation_reason == expected


def test_unknown_serial_gets_a_signed_unknown(ca: MemoryCa, table: Table) -> None:
    cert, _ = ca.device_cert("ocsp-unknown-1")  # never recorded in the table
    reply = respond(
        _der_request(cert, ca.issuing.cert), OcspResponder.by_issuer(ca.issuing), table, NOW
    )
    resp = ocsp.load_der_ocsp_response(reply.der)
    assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status is Status.UNKNOWN
    assert reply.outcome == "unknown"


@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.SHA256(), hashes.SHA384()])
def test_cert_id_is_echoed_with_the_requested_hash(
    ca: MemoryCa, table: Table, algorithm: hashes.HashAlgorithm
) -> None:
    cert, _ = ca.device_cert("ocsp-hash-1")
    table.rows[cert.serial_number] = CertStatusInfo.good()
    req_der = _der_request(cert, ca.issuing.cert, algorithm)
    req = ocsp.load_der_ocsp_request(req_der)
    resp = ocsp.load_der_ocsp_response(
        respond(req_der, OcspResponder.by_issuer(ca.issuing), table, NOW).der
    )
    assert resp.hash_algorithm.name == algorithm.name
    assert resp.issuer_key_hash == req.issuer_key_hash
    assert resp.issuer_name_hash == req.issuer_name_hash


@pytest.mark.parametrize("kind", [KeyType.RSA_2048, KeyType.ED25519, KeyType.EC_P384])
def test_issuer_hashes_match_what_clients_compute(kind: KeyType) -> None:
    other = make_ca(kind)
    cert, _ = other.device_cert("ocsp-kind-1")
    for algorithm in (hashes.SHA1(), hashes.SHA256()):
        req = ocsp.load_der_ocsp_request(_der_request(cert, other.issuing.cert, algorithm))
        assert cert_id_hashes(other.issuing.cert, algorithm) == (
            req.issuer_name_hash,
            req.issuer_key_hash,
        )
    table = Table()
    table.rows[cert.serial_number] = CertStatusInfo.good()
    reply = respond(
        _der_request(cert, other.issuing.cert), OcspResponder.by_issuer(other.issuing), table, NOW
    )
    resp = ocsp.load_der_ocsp_response(reply.der)
    assert resp.certificate_status is Status.GOOD
    _verify_signature(resp, other.issuing.key)


def test_other_issuer_is_unauthorized_and_not_looked_up(ca: MemoryCa, table: Table) -> None:
    stranger = make_ca()
    cert, _ = stranger.device_cert("ocsp-stranger-1")
    reply = respond(
        _der_request(cert, stranger.issuing.cert), OcspResponder.by_issuer(ca.issuing), table, NOW
    )
    resp = ocsp.load_der_ocsp_response(reply.der)
    assert resp.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert reply.outcome == "unauthorized"
    assert table.asked == []


def test_root_issued_cert_id_is_unauthorized(ca: MemoryCa, table: Table) -> None:
    # Same hierarchy, wrong CA: the issuing CA certificate's status belongs to the root.
    reply = respond(
        _der_request(ca.issuing.cert, ca.root.cert), OcspResponder.by_issuer(ca.issuing), table, NOW
    )
    assert reply.outcome == "unauthorized"


@pytest.mark.parametrize(
    "der",
    [
        b"",
        b"\x30",
        b"\x30\x03\x02\x01\x01",
        b"not an ocsp request at all",
        bytes(range(256)),
    ],
)
def test_garbage_is_malformed_request(ca: MemoryCa, table: Table, der: bytes) -> None:
    reply = respond(der, OcspResponder.by_issuer(ca.issuing), table, NOW)
    resp = ocsp.load_der_ocsp_response(reply.der)
    assert resp.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert reply.outcome == "malformedRequest"
    assert table.asked == []


def test_truncated_request_is_malformed(ca: MemoryCa, table: Table) -> None:
    cert, _ = ca.device_cert("ocsp-trunc-1")
    der = _der_request(cert, ca.issuing.cert, nonce=os.urandom(16))
    for cut in (1, 10, len(der) // 2, len(der) - 1):
        reply = respond(der[:cut], OcspResponder.by_issuer(ca.issuing), table, NOW)
        assert reply.outcome == "malformedRequest", cut


def test_request_with_trailing_bytes_is_malformed(ca: MemoryCa, table: Table) -> None:
    cert, _ = ca.device_cert("ocsp-trail-1")
    der = _der_request(cert, ca.issuing.cert) + b"\x00\x00"
    assert respond(der, OcspResponder.by_issuer(ca.issuing), table, NOW).outcome == (
        "malformedRequest"
    )


def test_oversized_nonce_is_malformed(ca: MemoryCa, table: Table) -> None:
    cert, _ = ca.device_cert("ocsp-nonce-1")
    der = _der_request(cert, ca.issuing.cert, nonce=os.urandom(129))
    assert respond(der, OcspResponder.by_issuer(ca.issuing), table, NOW).outcome == (
        "malformedRequest"
    )


def test_negative_serial_is_malformed_and_not_looked_up(ca: MemoryCa, table: Table) -> None:
    # cryptography cannot even encode a response echoing a negative serial: it used to raise
    # there, which the HTTP edge answered with internalError and an ERROR traceback.
    der = ocsp_request_for_negative_serial(ca.issuing.cert)
    assert ocsp.load_der_ocsp_request(der).serial_number == -5
    reply = respond(der, OcspResponder.by_issuer(ca.issuing), table, NOW)
    assert reply.outcome == "malformedRequest"
    resp = ocsp.load_der_ocsp_response(reply.der)
    assert resp.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert table.asked == []


def test_multi_certificate_request_from_openssl_is_malformed(
    ca: MemoryCa, table: Table, tmp_path: Path
) -> None:
    # RFC 5019 2.1.1: one Request per OCSPRequest; OpenSSL builds two with two -serial.
    issuer_pem = tmp_path / "issuer.pem"
    issuer_pem.write_bytes(ca.issuing.cert.public_bytes(serialization.Encoding.PEM))
    out = tmp_path / "req.der"
    argv = ["openssl", "ocsp", "-issuer", str(issuer_pem), "-serial", "0x10", "-serial", "0x11"]
    subprocess.run(
        [*argv, "-reqout", str(out), "-no_nonce"], check=True, capture_output=True, timeout=10
    )
    reply = respond(out.read_bytes(), OcspResponder.by_issuer(ca.issuing), table, NOW)
    assert reply.outcome == "malformedRequest"


def test_get_path_forms_decode_to_the_same_request(ca: MemoryCa) -> None:
    cert, _ = ca.device_cert("ocsp-get-1")
    der = _der_request(cert, ca.issuing.cert, nonce=os.urandom(16))
    b64 = base64.b64encode(der).decode()
    for form in (b64, urllib.parse.quote(b64, safe=""), b64.rstrip("=")):
        assert decode_get_request(form) == der


@pytest.mark.parametrize("path", ["", "%%%", "abc$def", "!!!!", "Zm9v\x00", "a"])
def test_broken_base64_in_get_is_malformed(ca: MemoryCa, table: Table, path: str) -> None:
    with pytest.raises(MalformedOcspRequest):
        decode_get_request(path)
    reply = respond_get(path, OcspResponder.by_issuer(ca.issuing), table, NOW)
    assert ocsp.load_der_ocsp_response(reply.der).response_status is (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )


def test_valid_base64_of_garbage_in_get_is_malformed(ca: MemoryCa, table: Table) -> None:
    path = base64.b64encode(b"hello world").decode()
    reply = respond_get(path, OcspResponder.by_issuer(ca.issuing), table, NOW)
    assert reply.outcome == "malformedRequest"


def test_get_returns_the_same_status_as_post(ca: MemoryCa, table: Table) -> None:
    cert, _ = ca.device_cert("ocsp-get-2")
    table.rows[cert.serial_number] = CertStatusInfo.revoked(REVOKED_AT, "superseded")
    path = urllib.parse.quote(base64.b64encode(_der_request(cert, ca.issuing.cert)).decode())
    reply = respond_get(path, OcspResponder.by_issuer(ca.issuing), table, NOW)
    resp = ocsp.load_der_ocsp_response(reply.der)
    assert resp.certificate_status is Status.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.superseded


def test_delegated_signer_certificate_profile(ca: MemoryCa) -> None:
    key = generate_key(KeyType.EC_P256)
    signer = build_ocsp_signer_certificate(key.public_key(), ca.issuing, NOW)
    signer.verify_directly_issued_by(ca.issuing.cert)
    ext = signer.extensions
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert isinstance(ext.get_extension_for_class(x509.OCSPNoCheck).value, x509.OCSPNoCheck)
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.issuing.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert signer.not_valid_after_utc - NOW <= timedelta(days=2)


def test_delegated_signer_signs_and_ships_its_certificate(ca: MemoryCa, table: Table) -> None:
    key = generate_key(KeyType.EC_P256)
    signer = build_ocsp_signer_certificate(key.public_key(), ca.issuing, NOW)
    responder = OcspResponder(ca.issuing.cert, signer, key)
    assert responder.delegated
    cert, _ = ca.device_cert("ocsp-deleg-1")
    table.rows[cert.serial_number] = CertStatusInfo.good()
    resp = ocsp.load_der_ocsp_response(
        respond(_der_request(cert, ca.issuing.cert), responder, table, NOW).der
    )
    assert resp.certificate_status is Status.GOOD
    assert resp.certificates == [signer]
    signer_ski = signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert resp.responder_key_hash == signer_ski.digest
    _verify_signature(resp, key)


def test_signer_without_ocsp_signing_eku_is_refused(ca: MemoryCa) -> None:
    cert, key = ca.device_cert("not-a-responder")
    with pytest.raises(BadOcspSigner, match="OCSPSigning"):
        OcspResponder(ca.issuing.cert, cert, key)


def test_signer_from_another_ca_is_refused(ca: MemoryCa) -> None:
    # Same subject names as ours (both made by make_ca): only the signature tells them apart.
    stranger = make_ca()
    key = generate_key(KeyType.EC_P256)
    signer = build_ocsp_signer_certificate(key.public_key(), stranger.issuing, NOW)
    with pytest.raises(BadOcspSigner, match="does not verify"):
        OcspResponder(ca.issuing.cert, signer, key)


def test_signer_key_must_match_its_certificate(ca: MemoryCa) -> None:
    key = generate_key(KeyType.EC_P256)
    signer = build_ocsp_signer_certificate(key.public_key(), ca.issuing, NOW)
    with pytest.raises(BadOcspSigner, match="key"):
        OcspResponder(ca.issuing.cert, signer, generate_key(KeyType.EC_P256))


def test_validity_must_be_positive(ca: MemoryCa) -> None:
    with pytest.raises(ValueError, match="positive"):
        OcspResponder.by_issuer(ca.issuing, validity=timedelta(0))
