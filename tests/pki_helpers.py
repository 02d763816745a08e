"""Test helpers: an in-memory CA and CSR builders (real keys, real signatures)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enroll_server.pki.ca import (
    Issuer,
    PkiUrls,
    build_issuing_ca,
    build_root_ca,
    build_server_certificate,
    server_hostnames,
)
from enroll_server.pki.keys import KeyType, PrivateKey, generate_key, signature_hash
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.registry import IssuedCertificate
from fleetpki.identity import DeviceId


def issued_record(cert: x509.Certificate, device_id: str) -> IssuedCertificate:
    """What the service hands to the registry for `cert` (record_issuance)."""
    return IssuedCertificate(
        serial=cert.serial_number,
        device_id=DeviceId(device_id),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        issuer_key_id=cert.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        ).value.key_identifier.hex(),  # type: ignore[union-attr]
    )


URLS = PkiUrls(
    crl="http://127.0.0.1:8080/crl",
    ocsp="http://127.0.0.1:8080/ocsp",
    ca_issuers="http://127.0.0.1:8080/ca.pem",
)


@dataclass
class MemoryCa:
    root: Issuer
    issuing: Issuer
    server_cert: x509.Certificate
    server_key: PrivateKey

    def device_cert(
        self,
        device_id: str,
        *,
        key: PrivateKey | None = None,
        now: datetime | None = None,
        profile: DeviceProfile | None = None,
    ) -> tuple[x509.Certificate, PrivateKey]:
        key = key or generate_key(KeyType.EC_P256)
        cert = build_device_certificate(
            key.public_key(),
            DeviceId(device_id),
            self.issuing,
            now or datetime.now(UTC),
            profile or DeviceProfile(),
        )
        return cert, key

    def chain_pem(self) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.issuing.cert, self.root.cert)
        )


def make_ca(kind: KeyType = KeyType.EC_P256, now: datetime | None = None) -> MemoryCa:
    now = now or datetime.now(UTC)
    root_key = generate_key(kind)
    root_cert = build_root_ca(root_key, "Test Root CA", now)
    root = Issuer(root_cert, root_key)
    issuing_key = generate_key(kind)
    issuing_cert = build_issuing_ca(issuing_key, root, "Test Issuing CA", now)
    issuing = Issuer(issuing_cert, issuing_key, URLS)
    server_key = generate_key(kind)
    server_cert = build_server_certificate(
        server_key.public_key(), issuing, server_hostnames([]), now
    )
    return MemoryCa(root, issuing, server_cert, server_key)


def make_csr(
    key: PrivateKey,
    cn: str | None,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
    extra_names: list[x509.NameAttribute] | None = None,
) -> x509.CertificateSigningRequest:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name(attrs + (extra_names or []))
    )
    for ext, critical in extensions or []:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, signature_hash(key))


def csr_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def ocsp_request_for_negative_serial(issuer: x509.Certificate) -> bytes:
    """A DER OCSPRequest naming `issuer` with serial number -5 (cryptography refuses to build
    one, so serial 1 is built and its INTEGER content octet rewritten)."""
    from cryptography.x509 import ocsp

    from enroll_server.pki.ocsp import cert_id_hashes

    name_hash, key_hash = cert_id_hashes(issuer, hashes.SHA1())
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(name_hash, key_hash, 1, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    assert der.endswith(b"\x02\x01\x01"), "the CertID's serial is the request's last element"
    return der[:-1] + b"\xfb"


def sign_request_info(key: ec.EllipticCurvePrivateKey, info: bytes) -> bytes:
    """A CertificationRequest (RFC 2986 4.2) around any certificationRequestInfo bytes,
    signed ecdsa-with-SHA256 by `key`: a request whose proof of possession holds (if the info
    carries `key`'s public key) whatever else the info says. For fuzzing and its regressions."""
    from enroll_server.pki import der

    algorithm = der.encode(0x30, der.encode(0x06, bytes.fromhex("2a8648ce3d040302")))
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return der.encode(0x30, info + algorithm + der.encode(0x03, b"\x00" + signature))
