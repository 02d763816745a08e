"""Device key pairs: the key types the agent supports, generation and PEM (de)serialization.

`serialization` is imported where used: it drags in the SSH and cipher modules (~0.4 MiB),
which an idle agent never needs.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from fleetpki.keys import KeyType, PrivateKey, generate_key, signature_hash

__all__ = [
    "KeyType",
    "PrivateKey",
    "generate_key",
    "load_private_key_pem",
    "new_key",
    "private_key_pem",
    "same_public_key",
    "signature_hash",
]


# Key generation's own threads. Not the loop's default executor: aiomqtt runs each MQTT connect
# there (paho's blocking TCP connect and TLS handshake), so after a broker restart a
# simulator's thousands of reconnects would queue ahead of a renewal's key (bench/soak.py,
# 2,000 agents in one process; renewals there still missed their window afterwards, for the
# loop's own lateness: simulators/shard.py). Made on first use.
_keygen: ThreadPoolExecutor | None = None


async def new_key(kind: KeyType) -> PrivateKey:
    """A fresh key pair, made off the event loop (RSA takes a while on a Pi; the loop and any
    other agents in the process stay responsive) in threads no other work queues in."""
    global _keygen
    if _keygen is None:
        _keygen = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fleetpki-keygen")
    return await asyncio.get_running_loop().run_in_executor(_keygen, generate_key, kind)


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the file's 0600 mode protects it (there is no one to type a
    passphrase on an unattended device)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(pem: bytes) -> PrivateKey:
    """Parse a PEM private key; raises ValueError (or TypeError) for anything else."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, PrivateKey):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def same_public_key(a: object, b: object) -> bool:
    """True if two public keys are the same key (compared by their SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        return bool(a.public_bytes(der, fmt) == b.public_bytes(der, fmt))  # type: ignore[attr-defined]
    except AttributeError:
        return False
