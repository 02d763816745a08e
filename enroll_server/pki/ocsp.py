"""The OCSP responder (RFC 6960): request bytes in, signed response bytes out."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll_server.pki.ca import Issuer, authority_key_identifier
from enroll_server.pki.crl import reason_flag
from enroll_server.pki.errors import PkiError
from enroll_server.pki.keys import PrivateKey, PublicKey, subject_public_key_bits
from enroll_server.pki.profile import SIGNATURE_ONLY_KEY_USAGE
from enroll_server.pki.serial import new_serial
from enroll_server.pki.signer import Signer, sign_ocsp, sign_x509

# RFC 9654 2.1 (which obsoletes RFC 8954): a nonce is 1..128 octets; longer or empty ones
# "MUST" be answered with malformedRequest.
MAX_NONCE_OCTETS = 128

# How long a response may be relied on (nextUpdate - thisUpdate, RFC 6960 2.4). Short, since
# DESIGN.md promises that a revocation is noticed at once, not at a cache's leisure.
DEFAULT_RESPONSE_VALIDITY = timedelta(minutes=10)

# A delegated signer carries id-pkix-ocsp-nocheck, so nobody can check whether it was revoked;
# RFC 6960 4.2.2.2.1 advises a short lifetime for exactly that reason.
DEFAULT_SIGNER_VALIDITY = timedelta(days=2)

# CertID hash algorithms we can match (RFC 6960 4.1.1; SHA-1 is what OpenSSL sends by default).
_CERT_ID_HASHES: tuple[type[hashes.HashAlgorithm], ...] = (
    hashes.SHA1,
    hashes.SHA224,
    hashes.SHA256,
    hashes.SHA384,
    hashes.SHA512,
)


class OcspError(PkiError):
    """Base of the errors raised by the OCSP responder."""


class MalformedOcspRequest(OcspError):
    """Request bytes (or a GET path) that are not one well-formed OCSPRequest."""

    def __init__(self, why: str, value: bytes | str = b"") -> None:
        super().__init__(f"malformed OCSP request: {why}")
        self.why = why
        self.value = value


class BadOcspSigner(OcspError):
    """A signer certificate that may not sign responses for the issuer (RFC 6960 4.2.2.2)."""

    def __init__(self, subject: str, why: str) -> None:
        super().__init__(f"{subject} cannot sign OCSP responses: {why}")
        self.subject = subject
        self.why = why


@dataclass(frozen=True, slots=True)
class CertStatusInfo:
    """What the registry knows about one serial: good, revoked (when, why) or unknown."""

    status: ocsp.OCSPCertStatus
    revoked_at: datetime | None = None
    reason: str | None = None  # RFC 5280 5.3.1 name; None or 'unspecified' is left out

    @classmethod
    def good(cls) -> CertStatusInfo:
        return cls(ocsp.OCSPCertStatus.GOOD)

    @classmethod
    def unknown(cls) -> CertStatusInfo:
        return cls(ocsp.OCSPCertStatus.UNKNOWN)

    @classmethod
    def revoked(cls, revoked_at: datetime, reason: str | None) -> CertStatusInfo:
        return cls(ocsp.OCSPCertStatus.REVOKED, revoked_at, reason)


Lookup = Callable[[int], CertStatusInfo]


@dataclass(frozen=True, slots=True)
class OcspReply:
    """A DER OCSPResponse plus what the HTTP edge needs: the outcome and the nextUpdate."""

    der: bytes
    outcome: str  # 'good', 'revoked', 'unknown', 'malformedRequest', 'unauthorized'
    next_update: datetime | None = None
    serial: int | None = None


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def cert_id_hashes(
    issuer_cert: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of `issuer_cert` under `algorithm` (RFC 6960 4.1.1)."""
    name_der = issuer_cert.subject.public_bytes()
    key_bits = subject_public_key_bits(issuer_cert.public_key())
    return _digest(algorithm, name_der), _digest(algorithm, key_bits)


def _is_delegated_signer(signer: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None if `signer` is a valid delegated responder of `issuer`, else why not."""
    if signer.issuer != issuer.subject:
        return "it is not issued by the CA it would answer for (RFC 6960 4.2.2.2)"
    try:
        signer.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return "its signature does not verify with the issuing CA's key"
    try:
        eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "it has no extended key usage"
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        return "its extended key usage lacks id-kp-OCSPSigning"
    return None


@dataclass(frozen=True)
class OcspResponder:
    """Answers for the certificates of `issuer_cert`, signing as `signer_cert`/`signer_key`.

    The signer is either the issuing CA itself or a delegated responder certificate issued by
    it (RFC 6960 4.2.2.2); a delegated signer is sent along in the response's `certs`.
    """

    issuer_cert: x509.Certificate
    signer_cert: x509.Certificate
    signer_key: PrivateKey | Signer
    validity: timedelta = DEFAULT_RESPONSE_VALIDITY
    _hashes: dict[str, tuple[bytes, bytes]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.validity <= timedelta(0):
            raise ValueError(f"OCSP response validity must be positive, got {self.validity}")
        subject = self.signer_cert.subject.rfc4514_string()
        if self.signer_cert.public_key() != self.signer_key.public_key():
            raise BadOcspSigner(subject, "its key is not the key given")
        if self.delegated:
            why = _is_delegated_signer(self.signer_cert, self.issuer_cert)
            if why is not None:
                raise BadOcspSigner(subject, why)
        table = {alg.name: cert_id_hashes(self.issuer_cert, alg()) for alg in _CERT_ID_HASHES}
        object.__setattr__(self, "_hashes", table)

    @classmethod
    def by_issuer(
        cls, issuer: Issuer, validity: timedelta = DEFAULT_RESPONSE_VALIDITY
    ) -> OcspResponder:
        """Responses signed by the issuing CA's own key."""
        return cls(issuer.cert, issuer.cert, issuer.key, validity)

    @property
    def delegated(self) -> bool:
        return self.signer_cert != self.issuer_cert

    def is_authoritative(
        self, algorithm: hashes.HashAlgorithm, name_hash: bytes, key_hash: bytes
    ) -> bool:
        """True when the CertID's issuer hashes name our issuing CA."""
        expected = self._hashes.get(algorithm.name)
        return expected is not None and expected == (name_hash, key_hash)


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    """An unsigned error response (RFC 6960 2.3): just the status, no responseBytes."""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


MALFORMED_REQUEST = unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED = unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)


def parse_request(der: bytes) -> ocsp.OCSPRequest:
    """One OCSPRequest; raises MalformedOcspRequest naming what is wrong.

    Only single-certificate requests are accepted: cryptography parses no other, and the
    lightweight profile (RFC 5019 2.1.1) requires exactly one Request per OCSPRequest.
    """
    return _parse(der)[0]


def _parse(der: bytes) -> tuple[ocsp.OCSPRequest, bytes | None]:
    try:
        request = ocsp.load_der_ocsp_request(der)
        nonce = _nonce(request)
    except (ValueError, NotImplementedError) as exc:
        # cryptography raises NotImplementedError for a request listing several certificates.
        raise MalformedOcspRequest(str(exc), der[:64]) from exc
    if nonce is not None and not 1 <= len(nonce) <= MAX_NONCE_OCTETS:
        raise MalformedOcspRequest(
            f"nonce of {len(nonce)} octets (RFC 9654 allows 1..{MAX_NONCE_OCTETS})"
        )
    if request.serial_number < 0:
        # RFC 5280 4.1.2.2: a serial number is a positive integer, so a negative one names no
        # certificate anyone issued (and a response echoing it cannot even be encoded).
        raise MalformedOcspRequest(f"negative serial number {request.serial_number}")
    return request, nonce


def _nonce(request: ocsp.OCSPRequest) -> bytes | None:
    # Reading .extensions parses them; a broken extension raises ValueError here.
    try:
        return request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


def respond(
    request_der: bytes, responder: OcspResponder, lookup: Lookup, now: datetime
) -> OcspReply:
    """The DER OCSPResponse for one DER OCSPRequest; never raises on bad input.

    - not a single well-formed request -> malformedRequest (RFC 6960 2.3, 4.2.1);
    - a CertID naming another issuer (or hashed with an algorithm we cannot match) ->
      unauthorized: RFC 6960 2.3 gives it for a server that "is not capable of responding
      authoritatively" (after RFC 5019 2.2.3). RFC 6960 2.2 would also allow a signed
      "unknown"; we prefer not to sign statements about other CAs' certificates;
    - else a signed response: good, revoked (time and, unless unspecified, reason) or unknown,
      the nonce echoed (RFC 6960 4.4.1), thisUpdate = now, nextUpdate = now + validity.
    """
    try:
        request, nonce = _parse(request_der)
    except MalformedOcspRequest:
        return OcspReply(MALFORMED_REQUEST, "malformedRequest")
    try:
        algorithm = request.hash_algorithm
    except UnsupportedAlgorithm:
        return OcspReply(UNAUTHORIZED, "unauthorized", serial=request.serial_number)
    if not responder.is_authoritative(algorithm, request.issuer_name_hash, request.issuer_key_hash):
        return OcspReply(UNAUTHORIZED, "unauthorized", serial=request.serial_number)
    serial = request.serial_number
    info = lookup(serial)
    next_update = now + responder.validity
    revocation_reason = None
    if info.status is ocsp.OCSPCertStatus.REVOKED:
        if info.revoked_at is None:
            raise ValueError(f"lookup said serial {serial:x} is revoked but gave no time")
        if info.reason not in (None, "unspecified"):
            revocation_reason = reason_flag(serial, info.reason)
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        # Echo the CertID exactly as asked, same hash algorithm (RFC 5019 2.2.1).
        issuer_name_hash=request.issuer_name_hash,
        issuer_key_hash=request.issuer_key_hash,
        serial_number=serial,
        algorithm=algorithm,
        cert_status=info.status,
        this_update=now,
        next_update=next_update,
        revocation_time=info.revoked_at if info.status is ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=revocation_reason,
    )
    if responder.delegated:
        # RFC 6960 4.2.2.2: the client needs the delegation certificate to verify the signature.
        builder = builder.certificates([responder.signer_cert])
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    # byKey (RFC 6960 4.2.1), the form RFC 5019 2.2.2 recommends: no name comparison.
    response = sign_ocsp(builder, responder.signer_cert, responder.signer_key)
    return OcspReply(
        response.public_bytes(serialization.Encoding.DER),
        info.status.name.lower(),
        next_update,
        serial,
    )


def decode_get_request(encoded: str) -> bytes:
    """The DER request carried in a GET path (RFC 6960 Appendix A.1).

    The path segment is the URL-encoding of the base64 of the DER request. Clients differ on
    whether they escape '/', '+' and '=' and whether they keep the padding, so all of those
    are accepted; anything else that is not base64 raises MalformedOcspRequest.
    """
    text = urllib.parse.unquote(encoded).strip()
    if not text:
        raise MalformedOcspRequest("empty GET request path", encoded)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedOcspRequest(f"GET path is not base64: {exc}", encoded[:64]) from exc


def respond_get(encoded: str, responder: OcspResponder, lookup: Lookup, now: datetime) -> OcspReply:
    """`respond` for the GET form; broken base64 gets malformedRequest."""
    try:
        der = decode_get_request(encoded)
    except MalformedOcspRequest:
        return OcspReply(MALFORMED_REQUEST, "malformedRequest")
    return respond(der, responder, lookup, now)


def build_ocsp_signer_certificate(
    public_key: PublicKey,
    issuer: Issuer,
    now: datetime,
    validity: timedelta = DEFAULT_SIGNER_VALIDITY,
) -> x509.Certificate:
    """A delegated OCSP responder certificate issued by `issuer` (RFC 6960 4.2.2.2).

    EKU id-kp-OCSPSigning only; id-pkix-ocsp-nocheck (4.2.2.2.1) so clients do not ask OCSP
    about the responder itself, hence the short lifetime; digitalSignature; CA:FALSE.
    """
    if validity <= timedelta(0):
        raise ValueError(f"signer validity must be positive, got {validity}")
    issuer_cn = issuer.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    base = str(issuer_cn[0].value) if issuer_cn else "fleetpki"
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetpki"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{base} OCSP Responder"),
        ]
    )
    # A few minutes back for relying parties whose clock lags, as for other certificates.
    not_before = now - timedelta(minutes=5)
    not_after = min(now + validity, issuer.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            SIGNATURE_ONLY_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(issuer.cert), critical=False)
    )
    return sign_x509(builder, issuer.key)
