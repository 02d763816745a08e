"""Key types we issue for: generation, identification of a public key, PEM (de)serialization."""

from __future__ import annotations

from enum import StrEnum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from enroll_server.pki.errors import BadPassphrase, UnsupportedKey

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    ED25519 = "ed25519"

    @classmethod
    def parse(cls, value: str) -> KeyType:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(k.value for k in cls)
            raise UnsupportedKey(f"unknown key type {value!r}; choose one of {choices}") from None


_CURVES: dict[str, KeyType] = {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}
# RSA below 2048 bits is refused (NIST SP 800-131A); above 4096 costs devices and us for nothing.
_RSA_SIZES: dict[int, KeyType] = {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072}
RSA_ACCEPTED_SIZES = (2048, 3072, 4096)


def generate_key(kind: KeyType) -> PrivateKey:
    if kind is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if kind is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if kind is KeyType.RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind is KeyType.RSA_3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ed25519.Ed25519PrivateKey.generate()


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


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash to sign with: None for Ed25519 (RFC 8410), SHA-384 for P-384, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


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
