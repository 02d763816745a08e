"""EST wire format: CSR bodies, PKCS#7 certs-only bodies, Retry-After, chain checks."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, pkcs7
from cryptography.x509.oid import ExtensionOID, NameOID

from device_agent.clock import parse_http_date
from device_agent.est_wire import (
    WireError,
    build_csr,
    check_cacerts,
    check_issued,
    decode_certs_only,
    encode_csr,
    order_chain,
    parse_retry_after,
)
from device_agent.keys import KeyType, generate_key
from enroll_server.pki import der
from enroll_server.pki.profile import DeviceProfile
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa, make_ca

DEV = DeviceId("dev-000001")


@pytest.mark.parametrize("kind", list(KeyType))
def test_csr_body_is_base64_der_with_subject_and_urn(kind: KeyType) -> None:
    key = generate_key(kind)
    body = encode_csr(build_csr(key, DEV))
    assert all(len(line) <= 64 for line in body.splitlines())
    csr = x509.load_der_x509_csr(base64.b64decode(body))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEV.value
    san = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [DEV.urn]


def _p7(*certs: x509.Certificate) -> bytes:
    return pkcs7.serialize_certificates(list(certs), Encoding.DER)


def test_decode_base64_with_newlines_and_raw_der(ca: MemoryCa) -> None:
    cert, _ = ca.device_cert(DEV.value)
    der = _p7(cert, ca.issuing.cert)
    b64 = base64.encodebytes(der)  # 76-column lines, as many servers send
    want = {cert, ca.issuing.cert}  # a DER SET OF: order is not preserved
    assert set(decode_certs_only(b64)) == want
    assert set(decode_certs_only(b64, "base64")) == want
    assert set(decode_certs_only(der, "binary")) == want
    assert set(decode_certs_only(der)) == want


@pytest.mark.parametrize(
    "body", [b"", b"   \n", b"not base64 at all!", base64.b64encode(b"0\x03abc")]
)
def test_decode_rejects_garbage(body: bytes) -> None:
    with pytest.raises(WireError):
        decode_certs_only(body)


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("30", now) == 30
    assert parse_retry_after("0", now) == 1  # never a tight loop
    assert parse_retry_after("999999999", now) == 86400
    assert parse_retry_after("Thu, 01 Jan 2026 00:02:00 GMT", now) == 120
    assert parse_retry_after("soon", now, default=45) == 45
    assert parse_retry_after(None, now) == 60


def test_order_chain_and_check_issued(ca: MemoryCa) -> None:
    key = generate_key(KeyType.EC_P256)
    cert, _ = ca.device_cert(DEV.value, key=key)  # type: ignore[arg-type]
    # Response with the issuing CA first, root included: reordered, root dropped.
    chain = order_chain(key, [ca.issuing.cert, cert, ca.root.cert], [])
    assert chain == [cert, ca.issuing.cert]
    # Response with the leaf alone: the issuing CA comes from /cacerts.
    assert order_chain(key, [cert], [ca.issuing.cert]) == [cert, ca.issuing.cert]
    check_issued(chain, key, DEV, [ca.root.cert], datetime.now(UTC))


def test_check_issued_refusals(ca: MemoryCa) -> None:
    key = generate_key(KeyType.EC_P256)
    now = datetime.now(UTC)
    cert, _ = ca.device_cert(DEV.value, key=key)  # type: ignore[arg-type]
    with pytest.raises(WireError, match="public key"):
        check_issued(
            [cert, ca.issuing.cert], generate_key(KeyType.EC_P256), DEV, [ca.root.cert], now
        )
    other, _ = ca.device_cert("dev-000002", key=key)  # type: ignore[arg-type]
    with pytest.raises(WireError, match="CN=dev-000001"):
        check_issued([other, ca.issuing.cert], key, DEV, [ca.root.cert], now)
    stranger = make_ca()
    with pytest.raises(WireError, match="trust anchor"):
        check_issued([cert, ca.issuing.cert], key, DEV, [stranger.root.cert], now)
    with pytest.raises(WireError, match="trust anchor"):
        check_issued([cert, ca.issuing.cert], key, DEV, [ca.root.cert], now + timedelta(days=90))
    with pytest.raises(WireError, match="no certificate"):
        order_chain(generate_key(KeyType.EC_P256), [cert], [])
    # Expired short-lived cert
    short, _ = ca.device_cert(
        DEV.value,
        key=key,
        now=now - timedelta(hours=1),
        profile=DeviceProfile(timedelta(minutes=1)),
    )  # type: ignore[arg-type]
    with pytest.raises(WireError):
        check_issued([short, ca.issuing.cert], key, DEV, [ca.root.cert], now)


def test_check_cacerts(ca: MemoryCa) -> None:
    assert check_cacerts([ca.issuing.cert, ca.root.cert], [ca.root.cert]) == [ca.issuing.cert]
    assert check_cacerts([ca.issuing.cert], [ca.root.cert]) == [ca.issuing.cert]
    assert check_cacerts([ca.root.cert], [ca.root.cert]) == []
    stranger = make_ca()
    with pytest.raises(WireError, match="trust anchor"):
        check_cacerts([stranger.issuing.cert, stranger.root.cert], [ca.root.cert])
    # A foreign CA mixed in is dropped, not trusted.
    assert check_cacerts([stranger.issuing.cert, ca.issuing.cert], [ca.root.cert]) == [
        ca.issuing.cert
    ]


# --- found by bench/fuzz/fuzz_agent_http.py and fuzz_agent_pkcs7.py: each escaped the agent's
# error classes (WireError -> EstProtocolError) and would have ended its run loop.
def test_pkcs7_that_is_not_signed_data_is_a_wire_error() -> None:
    # ContentInfo { id-data (1.2.840.113549.1.7.1), [0] OCTET STRING }: cryptography raised
    # UnsupportedAlgorithm ("Only basic signed structures are currently supported").
    data = der.encode(0x06, bytes.fromhex("2a864886f70d010701"))
    body = der.encode(0x30, data + der.encode(0xA0, der.encode(0x04, b"x")))
    for encoded in (body, base64.b64encode(body)):
        with pytest.raises(WireError, match="not a PKCS#7 certs-only"):
            decode_certs_only(encoded)


def test_pkcs7_holding_a_certificate_of_version_30_is_a_wire_error(ca: MemoryCa) -> None:
    cert, _ = ca.device_cert(DEV.value)
    body = pkcs7.serialize_certificates([cert], Encoding.DER)
    v3 = b"\xa0\x03\x02\x01\x02"  # tbsCertificate.version [0] EXPLICIT INTEGER 2 (v3)
    assert body.count(v3) == 1
    with pytest.raises(WireError, match="not a PKCS#7 certs-only"):
        decode_certs_only(body.replace(v3, b"\xa0\x03\x02\x01\x1e"), "binary")


def test_certificate_whose_key_cannot_load_is_not_ours(ca: MemoryCa) -> None:
    cert, key = ca.device_cert(DEV.value)
    raw = cert.public_bytes(Encoding.DER)
    point = cert.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert raw.count(point) == 1
    # The point moved off the curve: cert.public_key() raised ValueError("Invalid key").
    broken = x509.load_der_x509_certificate(raw.replace(point, point[:-1] + bytes([point[-1] ^ 1])))
    with pytest.raises(WireError, match="carries our public key"):
        order_chain(key, [broken], [])


def test_retry_after_of_non_ascii_digits_is_the_default() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    # '12¹¹0' (latin-1 0xb9 is SUPERSCRIPT ONE): str.isdigit() said yes, int() refused.
    assert parse_retry_after("12\xb9\xb9\xb90", now, default=45) == 45
    assert parse_retry_after("\u0663", now, default=45) == 45  # ARABIC-INDIC DIGIT THREE


def test_http_date_with_an_overflowing_field_is_no_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    value = "Sat, 05 Dec 2026 12:0" + "5" * 120 + "1:00 MT"  # parsedate: OverflowError
    assert parse_http_date(value) is None
    assert parse_retry_after(value, now, default=45) == 45
    # A date at the edge of datetime's range that its zone offset moves past it.
    assert parse_http_date("Fri, 31 Dec 9999 23:59:59 -0100") is None


def test_certificate_with_an_unreadable_subject_is_a_wire_error(ca: MemoryCa) -> None:
    cert, _ = ca.device_cert(DEV.value)
    subject = cert.subject.public_bytes()
    body = pkcs7.serialize_certificates([cert], Encoding.DER)
    assert body.count(subject) == 1
    # The CN's UTF8String tag (0x0c) mutated to 0x08 (EXTERNAL): check_issued's leaf.subject
    # raised ValueError ("UnexpectedTag ... location: subject").
    cn = DEV.value.encode()
    broken = subject.replace(b"\x0c" + bytes([len(cn)]) + cn, b"\x08" + bytes([len(cn)]) + cn)
    assert broken != subject
    with pytest.raises(WireError, match="certificate 1 of the reply has an unreadable name"):
        decode_certs_only(body.replace(subject, broken), "binary")
