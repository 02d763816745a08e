"""TLS client contexts: the trust anchor is the only root; hostnames checked; TLS >= 1.2."""

from __future__ import annotations

import ssl
from pathlib import Path

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not exported by the ssl module).
_NO_CHECK_TIME = 0x200000


def client_context(
    trust_anchor: Path,
    cert_path: Path | None = None,
    key_path: Path | None = None,
    *,
    check_time: bool = True,
) -> ssl.SSLContext:
    """A context that trusts only `trust_anchor` (never the system store) and, if given,
    presents the device certificate chain for mutual TLS.

    There is deliberately no way to turn verification off: a device that cannot verify the
    server keeps retrying or stops; it never talks to an unverified peer.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(trust_anchor))
    if not check_time:
        # Only for reading the server's Date header while our own clock is known to be wrong
        # (1970 after a cold boot): chain and host name are still verified, validity periods
        # cannot be, and nothing but that one header is used.
        ctx.verify_flags |= _NO_CHECK_TIME
    if cert_path is not None:
        # An explicit empty password: an encrypted key fails instead of prompting on a TTY.
        ctx.load_cert_chain(
            certfile=str(cert_path), keyfile=str(key_path) if key_path else None, password=b""
        )
    return ctx
