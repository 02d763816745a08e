"""The csrattrs answer (RFC 7030 4.5): which key types and signature algorithms we accept."""

from __future__ import annotations

from collections.abc import Iterable

from enroll_server.pki.keys import KeyType

# OIDs (RFC 5480, RFC 8410, RFC 4055, RFC 5758).
_ID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_SECP256R1 = "1.2.840.10045.3.1.7"
_SECP384R1 = "1.3.132.0.34"
_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
_ID_ED25519 = "1.3.101.112"
_ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
_ECDSA_WITH_SHA384 = "1.2.840.10045.4.3.3"
_SHA256_WITH_RSA = "1.2.840.113549.1.1.11"


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _len(len(content)) + content


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for arc in parts[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _seq(items: Iterable[bytes]) -> bytes:
    return _tlv(0x30, b"".join(items))


def _set(items: Iterable[bytes]) -> bytes:
    # DER SET OF: elements sorted by their encoding (X.690 11.6).
    return _tlv(0x31, b"".join(sorted(items)))


def csr_attrs_der(accepted: Iterable[KeyType]) -> bytes:
    """CsrAttrs ::= SEQUENCE OF AttrOrOID, as in the RFC 7030 4.5.2 example.

    EC keys are an Attribute {id-ecPublicKey, {curves}} (RFC 7030 4.5.2 / RFC 8295 4);
    RSA and Ed25519 are bare algorithm OIDs, with the signature algorithms we verify.
    """
    kinds = set(accepted)
    items: list[bytes] = []
    curves = [
        _oid(oid)
        for kind, oid in ((KeyType.EC_P256, _SECP256R1), (KeyType.EC_P384, _SECP384R1))
        if kind in kinds
    ]
    if curves:
        items.append(_seq([_oid(_ID_EC_PUBLIC_KEY), _set(curves)]))
        items.append(_oid(_ECDSA_WITH_SHA256))
        if KeyType.EC_P384 in kinds:
            items.append(_oid(_ECDSA_WITH_SHA384))
    if kinds & {KeyType.RSA_2048, KeyType.RSA_3072}:
        items.append(_oid(_RSA_ENCRYPTION))
        items.append(_oid(_SHA256_WITH_RSA))
    if KeyType.ED25519 in kinds:
        items.append(_oid(_ID_ED25519))
    return _seq(items)
