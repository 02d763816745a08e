"""The TLS policy of every fleetpki TLS listener: EST/HTTPS, the broker, mosquitto's config."""

from __future__ import annotations

import ssl

# TLS 1.2 suites with forward secrecy and AEAD only (RFC 9325 section 4.2): no CBC suites
# (Lucky13, "obsolete CBC"), no static RSA key exchange. TLS 1.3 suites are all AEAD. An
# OpenSSL cipher string: mosquitto's `ciphers` option takes the same one.
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def apply_tls_policy(ctx: ssl.SSLContext) -> None:
    """TLS 1.2 at least (RFC 9325 section 3.1.1), AEAD suites only, no compression (CRIME)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(AEAD_CIPHERS)
