"""CSR policy: what a certificate request may ask for, checked against the caller's grant."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from enroll_server.pki import der
from enroll_server.pki.errors import CsrRejected, UnsupportedKey
from enroll_server.pki.keys import KeyType, PublicKey, key_type_of
from fleetpki.identity import SERVICE_URN_PREFIX, URN_PREFIX, DeviceId
from fleetpki.topics import Role

# A P-384 or RSA-4096 CSR with a few extensions is < 2 KiB of DER; 16 KiB leaves ample room
# for any honest request and bounds what an unauthenticated peer can make us parse.
MAX_CSR_DER = 16 * 1024
DEFAULT_KEY_TYPES = frozenset(KeyType)


@dataclass(frozen=True, slots=True)
class Grant:
    """What an authenticated caller may obtain: authorization yields it, the issuer enforces it."""

    device_id: DeviceId
    role: Role = Role.DEVICE
    key_types: frozenset[KeyType] = field(default=DEFAULT_KEY_TYPES)


@dataclass(frozen=True, slots=True)
class ApprovedCsr:
    public_key: PublicKey
    key_type: KeyType | None


def load_csr(der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER PKCS#10 request (RFC 2986), refusing oversized or garbage input."""
    if len(der) > MAX_CSR_DER:
        raise CsrRejected(f"CSR of {len(der)} bytes exceeds the {MAX_CSR_DER}-byte limit")
    try:
        return x509.load_der_x509_csr(der)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion: version other than v1
        raise CsrRejected("body is not a DER-encoded PKCS#10 certificate request") from exc


_CN_OID_DER = b"\x06\x03\x55\x04\x03"  # id-at-commonName, 2.5.4.3
# PrintableString's alphabet (X.680 41.4).
_PRINTABLE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"


def _cn_only_names(value: str) -> tuple[bytes, ...]:
    """The DER of Name = CN=value alone, as UTF8String and (if it can be) PrintableString."""
    raw = value.encode("utf-8")
    # Deleting the printable characters leaves nothing iff the value is all printable.
    tags = (0x0C, 0x13) if not raw.translate(None, _PRINTABLE) else (0x0C,)
    return tuple(
        der.encode(0x30, der.encode(0x31, der.encode(0x30, _CN_OID_DER + der.encode(tag, raw))))
        for tag in tags
    )


def _subject_der(request: bytes) -> bytes:
    """The subject Name's DER of a well-formed PKCS#10 request (RFC 2986 4.1): the TLV after
    CertificationRequest.certificationRequestInfo.version."""
    _, info, _ = der.read(request, der.read(request)[1])
    _, _, version_end = der.read(request, info)
    return request[version_end : der.read(request, version_end)[2]]


def _subject_is_cn(request: bytes, value: str) -> bool:
    """Whether the subject is exactly CN=value: the common request, answered without
    decoding the Name into objects. False is no verdict: _subject_cn decides then."""
    try:
        return _subject_der(request) in _cn_only_names(value)
    except (IndexError, ValueError):
        return False


def _subject_cn(csr: x509.CertificateSigningRequest) -> str:
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError) as exc:
        # TypeError: an attribute cryptography cannot represent (a BIT STRING value under an
        # OID other than x500UniqueIdentifier).
        raise CsrRejected("CSR subject cannot be decoded") from exc
    if len(cns) != 1:
        raise CsrRejected(f"CSR subject must hold exactly one CN, found {len(cns)}")
    value = cns[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _check_extensions(csr: x509.CertificateSigningRequest, grant: Grant) -> None:
    """Refuse requests for what the grant does not allow; nothing requested is ever copied."""
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CsrRejected(f"CSR extension request cannot be decoded: {exc}") from exc
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CsrRejected("CSR requests CA:TRUE; end-entity certificates are never CAs")
        if isinstance(value, x509.ExtendedKeyUsage):
            wrong = [oid for oid in value if oid != ExtendedKeyUsageOID.CLIENT_AUTH]
            if wrong:
                names = ", ".join(
                    "serverAuth" if o == ExtendedKeyUsageOID.SERVER_AUTH else o.dotted_string
                    for o in wrong
                )
                raise CsrRejected(f"CSR requests extended key usage {names}; only clientAuth")
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise CsrRejected("CSR requests keyCertSign/cRLSign key usage")
        if isinstance(value, x509.SubjectAlternativeName):
            prefix = SERVICE_URN_PREFIX if grant.role is Role.SERVICE else URN_PREFIX
            ours = prefix + grant.device_id.value
            for name in value:
                if not (isinstance(name, x509.UniformResourceIdentifier) and name.value == ours):
                    raise CsrRejected(
                        f"CSR requests subject alternative name {name.value!s}; only {ours}"
                    )


# ecdsa-with-SHA* (RFC 5758 3.2): the signature algorithms of EC requests, by their hash.
_ECDSA_HASHES: dict[x509.ObjectIdentifier, type[hashes.HashAlgorithm]] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: hashes.SHA256,
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: hashes.SHA384,
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: hashes.SHA512,
}


# The hashes a request's self-signature may use. SHA-224 (and SHA-1, MD5) are refused: a
# proof of possession is only as strong as its hash, and SHA-224's 112-bit collision
# resistance is below the 128-bit level of the smallest key we accept (P-256; NIST SP 800-57
# Part 1 rev. 5, table 3) and of the SHA-256 the CA signs with. No client we know of signs
# with it (OpenSSL, the agent and every EST client default to SHA-256), so refusing costs
# nothing and leaves one strength to reason about. Ed25519 has no separate hash (None).
PROOF_HASHES = frozenset({"sha256", "sha384", "sha512"})


def _check_signature_hash(csr: x509.CertificateSigningRequest) -> None:
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise CsrRejected(f"CSR signature algorithm is not supported: {exc}") from None
    if algorithm is not None and algorithm.name not in PROOF_HASHES:
        raise CsrRejected(
            f"CSR is signed with {algorithm.name.upper()}; "
            "proof of possession needs SHA-256, SHA-384 or SHA-512"
        )


def signature_valid(csr: x509.CertificateSigningRequest, public_key: object) -> bool:
    """Whether the request's self-signature verifies under its own public key.

    An EC request signed with ECDSA (nearly every device) is verified with the key already
    loaded: `is_signature_valid` decodes the key a second time, ~12 us per request on this
    machine, 15 % of the check. Anything else goes to `is_signature_valid`.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        algorithm = _ECDSA_HASHES.get(csr.signature_algorithm_oid)
        if algorithm is not None:
            try:
                public_key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(algorithm()))
            except InvalidSignature:
                return False
            return True
    return csr.is_signature_valid


def check_csr(
    csr: x509.CertificateSigningRequest, grant: Grant, der: bytes | None = None
) -> ApprovedCsr:
    """Apply the policy: proof of possession, key type, CN = authenticated id, extensions.

    `der`: the request's DER, when the caller has it (a shortcut for the subject check).
    """
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedKey, UnsupportedAlgorithm) as exc:
        # UnsupportedAlgorithm: a SubjectPublicKeyInfo algorithm cryptography does not know.
        raise CsrRejected(f"CSR public key cannot be used: {exc}") from exc
    # RFC 2986 4.2 / RFC 7030 3.4: the self-signature proves possession of the private key.
    _check_signature_hash(csr)
    if not signature_valid(csr, public_key):
        raise CsrRejected("CSR signature is invalid (no proof of possession of the private key)")
    try:
        key_type = key_type_of(public_key)
    except UnsupportedKey as exc:
        raise CsrRejected(exc.reason) from exc
    if key_type is not None and key_type not in grant.key_types:
        raise CsrRejected(f"key type {key_type.value} is not accepted by this CA")
    if der is None or not _subject_is_cn(der, grant.device_id.value):
        cn = _subject_cn(csr)
        if cn != grant.device_id.value:
            raise CsrRejected(
                f"CSR subject CN {cn!r} does not match the authenticated id "
                f"{grant.device_id.value!r}"
            )
    _check_extensions(csr, grant)
    if not isinstance(public_key, PublicKey):
        raise CsrRejected(f"key type {type(public_key).__name__} is not accepted")
    return ApprovedCsr(public_key=public_key, key_type=key_type)
