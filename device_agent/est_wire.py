"""EST wire format (RFC 7030): CSR bodies out, PKCS#7 certs-only bodies in, and their checks.

Pure: bytes and cryptography objects in and out; the sockets live in est_client.py.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from device_agent.anchors import directly_issued, is_self_signed
from device_agent.clock import parse_http_date
from device_agent.keys import PrivateKey, same_public_key, signature_hash
from fleetpki.identity import DeviceId


class WireError(ValueError):
    """A body that is not what RFC 7030 says it should be."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def build_csr(key: PrivateKey, device_id: DeviceId) -> x509.CertificateSigningRequest:
    """PKCS#10 request: CN = device id and the device URN as SAN (the CA sets the rest).

    RFC 7030 4.2.2: a re-enrollment request carries the same subject as the current
    certificate, so the same function serves both.
    """
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id.value)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_id.urn)]),
            critical=False,
        )
    )
    return builder.sign(key, signature_hash(key))


def encode_csr(csr: x509.CertificateSigningRequest) -> bytes:
    """The simpleenroll body: base64 of the DER CSR (RFC 7030 4.2.1, RFC 8951), in 64-column
    lines as RFC 2045 wants."""
    b64 = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
    return b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64)) + b"\n"


def decode_certs_only(body: bytes, transfer_encoding: str | None = None) -> list[x509.Certificate]:
    """Certificates of a PKCS#7 certs-only body.

    RFC 8951 fixed the body as base64 whatever Content-Transfer-Encoding says, and some servers
    omit the header; a few old ones send raw DER with 'binary'. Accept both: try base64 first
    (DER never decodes as base64 into something starting with a SEQUENCE by accident and then
    parses), fall back to DER.
    """
    if not body.strip():
        raise WireError("empty body where a PKCS#7 certs-only structure was expected")
    candidates: list[bytes] = []
    if (transfer_encoding or "").strip().lower() != "binary":
        try:
            candidates.append(base64.b64decode(b"".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            pass
    candidates.append(body)
    last: Exception | None = None
    for der in candidates:
        try:
            certs = pkcs7.load_der_pkcs7_certificates(der)
        except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
            # UnsupportedAlgorithm: a ContentInfo other than signedData (RFC 2315 7);
            # InvalidVersion: a certificate of a version other than 1..3 (RFC 5280 4.1.2.1).
            last = exc
            continue
        if not certs:
            raise WireError("PKCS#7 certs-only structure holds no certificate")
        for number, cert in enumerate(certs, 1):
            try:
                # Parsed lazily by cryptography; the chain checks compare both.
                cert.subject, cert.issuer  # noqa: B018
            except (ValueError, TypeError) as exc:
                why = f"certificate {number} of the reply has an unreadable name: {exc}"
                raise WireError(why) from exc
        return certs
    raise WireError(f"not a PKCS#7 certs-only structure (base64 or DER): {last}")


def parse_retry_after(value: str | None, now: datetime, default: float = 60.0) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date, RFC 9110
    10.2.3), clamped to [1 s, 1 day] so a bad header cannot cause a tight loop or a hang."""
    seconds: float = default
    if value:
        text = value.strip()
        # ASCII digits only (RFC 9110 10.2.3: delta-seconds = 1*DIGIT): str.isdigit() also
        # says yes to '¹' and '٣', which int() refuses.
        if text.isascii() and text.isdigit():
            seconds = float(int(text))
        else:
            when = parse_http_date(text)
            if when is not None:
                seconds = (when - now).total_seconds()
    return min(max(seconds, 1.0), 86400.0)


def _public_key(cert: x509.Certificate) -> object:
    """The certificate's public key, or None if it cannot be loaded (a broken or unknown
    SubjectPublicKeyInfo is not our key)."""
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None


def _key_ids_match(cert: x509.Certificate, parent: x509.Certificate) -> bool:
    """False only when both key identifiers are there and differ (RFC 5280 4.2.1.1): after a
    root rollover two CAs share a name, and only the key identifiers tell them apart."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = parent.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except (x509.ExtensionNotFound, ValueError):
        return True
    return aki.key_identifier is None or aki.key_identifier == ski.digest


def order_chain(
    leaf_key: PrivateKey,
    certs: Sequence[x509.Certificate],
    extra_cas: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate] = (),
) -> list[x509.Certificate]:
    """The chain to store and present in TLS: our leaf first, then its issuers up to (not
    including) a self-signed root, or up to the first one one of `anchors` issued (after a root
    rollover /cacerts also holds cross-certificates: a device that trusts only the old root
    ends its chain with the old-signed-new one, a device that trusts the new root stops
    before it). Issuers come from the response or from /cacerts."""
    leaves = [c for c in certs if same_public_key(_public_key(c), leaf_key.public_key())]
    if not leaves:
        raise WireError("no certificate in the response carries our public key")
    chain = [leaves[0]]
    pool = [c for c in [*certs, *extra_cas] if c is not leaves[0]]
    while len(chain) < 8:
        current = chain[-1]
        if any(directly_issued(current, a) for a in anchors):
            break
        parent = next(
            (
                c
                for c in pool
                if c.subject == current.issuer
                and not is_self_signed(c)
                and _key_ids_match(current, c)
            ),
            None,
        )
        if parent is None or parent in chain:
            break
        chain.append(parent)
    return chain


def check_issued(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    device_id: DeviceId,
    anchors: Sequence[x509.Certificate],
    now: datetime,
) -> None:
    """Refuse a certificate we must not install: wrong key, wrong name, or not chaining (as a
    clientAuth certificate, RFC 5280 path validation at `now`) to one of the trust anchors."""
    leaf = chain[0]
    if not same_public_key(leaf.public_key(), key.public_key()):
        raise WireError("the certificate does not carry our public key")
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cns] != [device_id.value]:
        raise WireError(
            f"certificate subject {leaf.subject.rfc4514_string()!r} is not CN={device_id}"
        )
    # A root rollover's old-signed-new certificate (self-issued: both roots share a name,
    # pki/root_rollover.py) is where our chain meets an old anchor. cryptography's verifier does
    # not build through a self-issued intermediate (OpenSSL does), so one that an anchor signed
    # and that is valid now stands in for that anchor: the path is the same, checked in full.
    stand_ins = [
        c
        for c in chain[1:]
        if c.subject == c.issuer
        and c.not_valid_before_utc <= now <= c.not_valid_after_utc
        and any(directly_issued(c, a) for a in anchors)
    ]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([*anchors, *stand_ins]))
        .time(now)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, [c for c in chain[1:] if c not in stand_ins])
    except verification.VerificationError as exc:
        raise WireError(f"certificate does not chain to the trust anchor: {exc}") from exc


def check_cacerts(
    certs: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """The CA certificates of a /cacerts answer that chain to our trust anchors (RFC 7030
    4.1.3: the client must verify them against its explicit trust anchor, not trust them
    blindly). Raises WireError if none does. These only help build our chain; a new root
    becomes an anchor only through device_agent.anchors."""
    trusted: list[x509.Certificate] = list(anchors)
    progress = True
    while progress:
        progress = False
        for cert in certs:
            if cert in trusted:
                continue
            if any(directly_issued(cert, parent) for parent in trusted):
                trusted.append(cert)
                progress = True
    if len(trusted) == len(anchors) and not any(a in certs for a in anchors):
        raise WireError("no certificate in /cacerts chains to the trust anchor")
    return [c for c in trusted if c not in anchors]
