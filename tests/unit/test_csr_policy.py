"""CSR policy, tested with real signed requests and no server."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll_server.pki import der
from enroll_server.pki.csr_policy import (
    MAX_CSR_DER,
    Grant,
    _subject_is_cn,
    check_csr,
    load_csr,
)
from enroll_server.pki.errors import CsrRejected
from enroll_server.pki.keys import KeyType, generate_key
from fleetpki.identity import DeviceId
from fleetpki.topics import Role
from tests.pki_helpers import csr_der, make_csr, sign_request_info

GRANT = Grant(DeviceId("dev-1"))


def test_good_csr_is_approved() -> None:
    key = generate_key(KeyType.EC_P256)
    approved = check_csr(load_csr(csr_der(make_csr(key, "dev-1"))), GRANT)
    assert approved.key_type is KeyType.EC_P256
    assert approved.public_key.public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def test_our_own_san_is_allowed() -> None:
    key = generate_key(KeyType.ED25519)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:fleetpki:device:dev-1")])
    check_csr(make_csr(key, "dev-1", [(san, False)]), GRANT)


def test_garbage_is_rejected() -> None:
    with pytest.raises(CsrRejected, match="not a DER-encoded PKCS#10"):
        load_csr(b"\x30\x03garbage")


def test_oversized_is_rejected() -> None:
    with pytest.raises(CsrRejected, match="exceeds"):
        load_csr(b"\x00" * (MAX_CSR_DER + 1))


def test_bad_signature_is_rejected() -> None:
    key = generate_key(KeyType.EC_P256)
    der = bytearray(csr_der(make_csr(key, "dev-1")))
    der[-5] ^= 0xFF  # flip bits inside the signature value
    csr = load_csr(bytes(der))
    with pytest.raises(CsrRejected, match="signature is invalid"):
        check_csr(csr, GRANT)


def _parts(request: bytes) -> list[bytes]:
    """certificationRequestInfo, signatureAlgorithm, signature (RFC 2986 4.2)."""
    _, start, end = der.read(request)
    return list(der.children(request, start, end))


def _signed(key: object, algorithm: hashes.HashAlgorithm | None, cn: str = "dev-1") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    return csr_der(builder.sign(key, algorithm))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "algorithm"),
    [
        (KeyType.EC_P256, hashes.SHA256()),
        (KeyType.EC_P256, hashes.SHA512()),  # verified with the loaded key, by its OID's hash
        (KeyType.EC_P384, hashes.SHA384()),
        (KeyType.RSA_2048, hashes.SHA256()),  # no fast path: is_signature_valid decides
        (KeyType.RSA_2048, hashes.SHA384()),
        (KeyType.ED25519, None),
    ],
)
def test_proof_of_possession_for_each_key_and_hash(
    kind: KeyType, algorithm: hashes.HashAlgorithm | None
) -> None:
    key = generate_key(kind)
    good = _signed(key, algorithm)
    assert check_csr(load_csr(good), GRANT).key_type is kind
    # The request's info with another key's signature over it: the key in it did not sign it.
    info, _, _ = _parts(good)
    _, algorithm_id, signature = _parts(_signed(generate_key(kind), algorithm))
    forged = der.encode(0x30, info + algorithm_id + signature)
    with pytest.raises(CsrRejected, match="signature is invalid"):
        check_csr(load_csr(forged), GRANT)


@pytest.mark.parametrize(
    ("kind", "algorithm"),
    [(kind, hashes.SHA224()) for kind in (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048)],
)
def test_weak_proof_of_possession_hash_is_refused(
    kind: KeyType, algorithm: hashes.HashAlgorithm
) -> None:
    """A valid self-signature over SHA-224 is no proof of possession here."""
    request = _signed(generate_key(kind), algorithm)
    with pytest.raises(CsrRejected, match=f"signed with {algorithm.name.upper()}"):
        check_csr(load_csr(request), GRANT)


def test_weak_rsa_is_rejected() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CsrRejected, match="1024 bits"):
        check_csr(csr, GRANT)


def test_unknown_curve_is_rejected() -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CsrRejected, match="curve secp256k1"):
        check_csr(csr, GRANT)


def test_key_type_outside_grant_is_rejected() -> None:
    grant = Grant(DeviceId("dev-1"), key_types=frozenset({KeyType.EC_P256}))
    with pytest.raises(CsrRejected, match="ed25519 is not accepted"):
        check_csr(make_csr(generate_key(KeyType.ED25519), "dev-1"), grant)


def test_cn_mismatch_is_rejected() -> None:
    with pytest.raises(CsrRejected, match="'dev-2' does not match the authenticated id 'dev-1'"):
        check_csr(make_csr(generate_key(KeyType.EC_P256), "dev-2"), GRANT)


def test_missing_cn_is_rejected() -> None:
    with pytest.raises(CsrRejected, match="exactly one CN, found 0"):
        check_csr(make_csr(generate_key(KeyType.EC_P256), None), GRANT)


def test_two_cns_are_rejected() -> None:
    extra = [x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]
    with pytest.raises(CsrRejected, match="found 2"):
        check_csr(make_csr(generate_key(KeyType.EC_P256), "dev-1", extra_names=extra), GRANT)


def test_ca_true_is_rejected() -> None:
    bc = x509.BasicConstraints(ca=True, path_length=None)
    with pytest.raises(CsrRejected, match="CA:TRUE"):
        check_csr(make_csr(generate_key(KeyType.EC_P256), "dev-1", [(bc, True)]), GRANT)


def test_server_auth_is_rejected() -> None:
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(CsrRejected, match="serverAuth"):
        check_csr(make_csr(generate_key(KeyType.EC_P256), "dev-1", [(eku, False)]), GRANT)


def test_key_cert_sign_is_rejected() -> None:
    ku = x509.KeyUsage(True, False, False, False, False, True, False, False, False)
    with pytest.raises(CsrRejected, match="keyCertSign"):
        check_csr(make_csr(generate_key(KeyType.EC_P256), "dev-1", [(ku, True)]), GRANT)


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("evil.example"),
        x509.UniformResourceIdentifier("urn:fleetpki:device:dev-2"),
        x509.RFC822Name("a@b.c"),
    ],
)
def test_foreign_san_is_rejected(name: x509.GeneralName) -> None:
    san = x509.SubjectAlternativeName([name])
    with pytest.raises(CsrRejected, match="subject alternative name"):
        check_csr(make_csr(generate_key(KeyType.EC_P256), "dev-1", [(san, False)]), GRANT)


def test_service_grant_expects_service_urn() -> None:
    grant = Grant(DeviceId("backend"), role=Role.SERVICE)
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("urn:fleetpki:device:backend")]
    )
    with pytest.raises(CsrRejected):
        check_csr(make_csr(generate_key(KeyType.EC_P256), "backend", [(san, False)]), grant)


def _subjects() -> list[tuple[str, list[x509.NameAttribute]]]:
    cn = NameOID.COMMON_NAME
    return [
        ("utf8", [x509.NameAttribute(cn, "dev-1")]),
        ("printable", [x509.NameAttribute(cn, "dev-1", _type=_ASN1Type.PrintableString)]),
        ("ia5", [x509.NameAttribute(cn, "dev-1", _type=_ASN1Type.IA5String)]),
        (
            "with-org",
            [
                x509.NameAttribute(cn, "dev-1"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
            ],
        ),
        (
            "long",  # a Name over 127 octets: long-form DER lengths all the way down
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o" * 60),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * 60),
                x509.NameAttribute(cn, "dev-1"),
            ],
        ),
        ("other-cn", [x509.NameAttribute(cn, "dev-2")]),
        ("prefix-cn", [x509.NameAttribute(cn, "dev-11")]),
        ("no-cn", [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dev-1")]),
        ("two-cns", [x509.NameAttribute(cn, "dev-1"), x509.NameAttribute(cn, "dev-1")]),
    ]


def _verdict(csr: x509.CertificateSigningRequest, der: bytes | None) -> str:
    try:
        check_csr(csr, GRANT, der)
    except CsrRejected as exc:
        return exc.reason
    return "approved"


@pytest.mark.parametrize(("label", "attrs"), _subjects(), ids=[s[0] for s in _subjects()])
def test_subject_shortcut_agrees_with_decoding_the_name(
    label: str, attrs: list[x509.NameAttribute]
) -> None:
    """check_csr with the DER (the server's path) decides exactly as without it."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .sign(generate_key(KeyType.EC_P256), hashes.SHA256())
    )
    der = csr_der(csr)
    assert _verdict(csr, der) == _verdict(csr, None)
    assert (_verdict(csr, der) == "approved") == (
        label in ("utf8", "printable", "ia5", "with-org", "long")
    )
    # The shortcut answers only the plain CN=<id> subjects; the rest are decoded.
    assert _subject_is_cn(der, "dev-1") == (label in ("utf8", "printable"))


def test_subject_shortcut_never_accepts_a_truncated_request() -> None:
    der = csr_der(make_csr(generate_key(KeyType.EC_P256), "dev-1"))
    assert _subject_is_cn(der, "dev-1")
    for cut in (0, 1, 2, 5, 10, 20):
        assert not _subject_is_cn(der[:cut], "dev-1")


# --- found by bench/fuzz/fuzz_csr_policy.py (each was an exception the EST edge answered 500) --
# The certificationRequestInfo of each crashing input; whatever signs it, it fails before the
# signature is looked at.
FUZZ_FINDINGS = {
    # The SubjectPublicKeyInfo's algorithm OID mutated to 1.2.72.108349.2.1: cryptography's
    # csr.public_key() raised UnsupportedAlgorithm.
    "unknown public key algorithm": (
        "307502010030133111300f06035504030c086465762d303030313059301306072a4886ce3d020106082a86"
        "48ce3d03010703420004efeff35b79ff1301a8e30e4e3ac8900c6cb149884c6ac97fb8ef9cafe7a63b88ca"
        "1288ce2637c20a053dfe74e3ec89386ab78b58fada55ba195f8a4263d808d0a000",
        "public key cannot be used",
    ),
    # version 8 (RFC 2986 4.1 knows only v1 = 0): x509.InvalidVersion, not a ValueError.
    "version 8": (
        "307502010830133111300f06035504030c086465762d303030313059301306072a8648ce3d020106082a86"
        "48ce3d03010703420004efeff35b79ff1301a8e30e4e3ac8900c6cb149884c6ac97fb8ef9cafe7a63b88ca"
        "1288ce2637c20a053dfe74e3ec89386ab78b58fada55ba195f8a4263d808d0a000",
        "not a DER-encoded PKCS#10",
    ),
    # A subject attribute 2.5.4.12 (title) holding a BIT STRING: csr.subject raised TypeError.
    "BIT STRING subject attribute": (
        "3081c402010030133111300f060355040c0308e465762d303030313059301306072a8648ce3d020106082a"
        "8648ce3d03010703420004695e8fc21f6510b982715397983b032f34a611b669d2f05e5f308074572a5409"
        "ed27e5c5949e5107042bddc5aa14cabcf4ea59a9713959b37d8c21b48783dd5ba04f304d06092a864886f7"
        "0d01090e3140303e30270603551d1104e0cfe179e38a8d973a666c656574706b693a6425766963653a6465"
        "762d3030303130130603551d25040c300a06082b06010505070302",
        "subject cannot be decoded",
    ),
}


@pytest.mark.parametrize("case", sorted(FUZZ_FINDINGS))
def test_fuzzed_requests_are_rejected_with_a_reason(case: str) -> None:
    info, words = FUZZ_FINDINGS[case]
    key = ec.generate_private_key(ec.SECP256R1())
    raw = bytes.fromhex(info)
    if case != "unknown public key algorithm":  # that one fails at its key, not its signature
        # The input's P-256 SubjectPublicKeyInfo (91 bytes) replaced by this key's, so that
        # the proof of possession holds as it did in the fuzzing run.
        at = raw.index(b"\x30\x59\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01")
        spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        raw = raw[:at] + spki + raw[at + 91 :]
    request = sign_request_info(key, raw)
    with pytest.raises(CsrRejected, match=words):
        check_csr(load_csr(request), Grant(DeviceId("dev-0001")), request)
