"""Fuzz the CSR policy (enroll_server/pki/csr_policy.py) the way an EST body reaches it.

Three shapes of input, by the first byte:
  0  an EST simpleenroll body (base64 text, RFC 8951 3) -> csr_of -> load_csr -> check_csr;
  1  raw DER -> load_csr -> check_csr;
  2  the certificationRequestInfo only: the harness signs it with a fixed P-256 key and wraps
     it into a CertificationRequest, so mutations of the subject, attributes and extensions
     carry a valid proof of possession and reach every rule behind the signature check.
A request the policy approves is issued (build_device_certificate) and the certificate must
name the authenticated id and say clientAuth only. Anything raised but CsrRejected/BadRequest
is a crash.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from enroll_server.errors import BadRequest
    from enroll_server.est.operations import csr_of
    from enroll_server.pki import der as derlib
    from enroll_server.pki.csr_policy import Grant, check_csr, load_csr
    from enroll_server.pki.errors import CsrRejected
    from enroll_server.pki.keys import KeyType, generate_key
    from enroll_server.pki.profile import DeviceProfile, build_device_certificate
    from fleetpki.identity import DeviceId
    from fleetpki.topics import Role
    from tests.pki_helpers import make_ca, make_csr, sign_request_info

DEVICE = "dev-0001"
GRANTS = (Grant(DeviceId(DEVICE)), Grant(DeviceId(DEVICE), role=Role.SERVICE))
CA = make_ca()
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
# A fixed key: the corpus's signed infos carry its public key and stay valid across runs.
KEY = ec.derive_private_key(0x18F022, ec.SECP256R1())


def sign_info(info: bytes) -> bytes:
    return sign_request_info(KEY, info)


def info_of(csr_der: bytes) -> bytes:
    _, start, _ = derlib.read(csr_der, 0)
    _, _, end = derlib.read(csr_der, start)
    return csr_der[start:end]


def check(der: bytes) -> None:
    csr = load_csr(der)
    for grant in GRANTS:
        try:
            approved = check_csr(csr, grant, der)
        except CsrRejected:
            continue
        cert = build_device_certificate(
            approved.public_key, grant.device_id, CA.issuing, NOW, DeviceProfile(), grant.role
        )
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [a.value for a in cn] == [DEVICE], cert.subject
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH], eku


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    try:
        if mode == 0:
            check(csr_of(rest))
        elif mode == 1:
            check(rest)
        else:
            check(sign_info(rest))
    except (CsrRejected, BadRequest):
        pass


def seeds() -> list[bytes]:
    out = []
    for kind in (KeyType.EC_P256, KeyType.ED25519, KeyType.RSA_2048):
        key = generate_key(kind)
        der = make_csr(key, DEVICE).public_bytes(serialization.Encoding.DER)
        out += [b"\x00" + base64.b64encode(der), b"\x01" + der]
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("urn:fleetpki:device:" + DEVICE)]
    )
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    for exts in ([], [(san, False)], [(san, False), (eku, False)]):
        der = make_csr(KEY, DEVICE, exts).public_bytes(serialization.Encoding.DER)
        out.append(b"\x02" + info_of(der))
    return out


if __name__ == "__main__":
    _harness.main("csr_policy", test_one_input, seeds)
