"""Key types we issue for: generation, identification of a public key, PEM (de)serialization."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from enroll_server.pki import der
from enroll_server.pki.errors import BadPassphrase, UnsupportedKey
from fleetpki.keys import KeyType, PrivateKey, PublicKey, generate_key, signature_hash

__all__ = [
    "RSA_ACCEPTED_SIZES",
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "generate_key",
    "key_type_of",
    "load_private_key_pem",
    "parse_key_type",
    "private_key_pem",
    "signature_hash",
    "subject_public_key_bits",
]


def parse_key_type(value: str) -> KeyType:
    """A KeyType from its name, or UnsupportedKey listing the choices."""
    try:
        return KeyType(value)
    except ValueError:
        choices = ", ".join(k.value for k in KeyType)
        raise UnsupportedKey(f"unknown key type {value!r}; choose one of {choices}") from None


_CURVES: dict[str, KeyType] = {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}
# RSA below 2048 bits is refused (NIST SP 800-131A); above 4096 costs devices and us for nothing.
_RSA_SIZES: dict[int, KeyType] = {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072}
RSA_ACCEPTED_SIZES = (2048, 3072, 4096)


def key_type_of(public_key: object) -> KeyType | None:
    """The KeyType of a public key; None for RSA-4096 (accepted); else UnsupportedKey."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        kind = _CURVES.get(public_key.curve.name)
        if kind is None:
            raise UnsupportedKey(
                f"curve {public_key.curve.name} is not accepted (use P-256 or P-384)"
            )
        return kind
    if isinstance(public_key, rsa.RSAPublicKey):
        size = public_key.key_size
        if size not in RSA_ACCEPTED_SIZES:
            raise UnsupportedKey(f"RSA key of {size} bits is not accepted (2048, 3072 or 4096)")
        if public_key.public_numbers().e != 65537:
            raise UnsupportedKey("RSA public exponent must be 65537")
        return _RSA_SIZES.get(size)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    raise UnsupportedKey(f"key type {type(public_key).__name__} is not accepted")


def private_key_pem(key: PrivateKey, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM, encrypted with the best available scheme when a passphrase is given."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def load_private_key_pem(pem: bytes, passphrase: bytes | None, what: str = "key") -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise BadPassphrase(what) from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise UnsupportedKey(f"{what}: key type {type(key).__name__} is not supported")
    return key


def subject_public_key_bits(public_key: CertificatePublicKeyTypes) -> bytes:
    """The subjectPublicKey BIT STRING value (no unused-bits octet), what issuerKeyHash hashes.

    RFC 6960 4.1.1: "the hash of the issuer's public key ... excluding the tag and length
    fields" of the BIT STRING in the issuer certificate's SubjectPublicKeyInfo.
    """
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _, seq_start, _ = der.read(spki, 0)  # SubjectPublicKeyInfo SEQUENCE
    _, _, alg_end = der.read(spki, seq_start)  # AlgorithmIdentifier
    tag, bits_start, bits_end = der.read(spki, alg_end)
    if tag != 0x03:
        raise ValueError(f"SubjectPublicKeyInfo without a BIT STRING (tag {tag:#x})")
    return spki[bits_start + 1 : bits_end]
