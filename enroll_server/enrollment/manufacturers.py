"""The manufacturer CAs a home trusts for factory birth certificates (H/manufacturers/*/ca.pem),
re-read whenever the folder changes, so that removing a CA file cuts it off at once."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("fleetpki.manufacturers")

# Seconds between looks at the folder by `fleetpki serve` (for CAs added while it runs).
REFRESH_INTERVAL = 5.0

MANUFACTURERS_DIR = "manufacturers"
CA_CERT = "ca.pem"


def manufacturers_dir(home: Path) -> Path:
    return Path(home) / MANUFACTURERS_DIR


def trusted_manufacturer_ca_files(home: Path) -> list[Path]:
    """Every manufacturer CA certificate of the home (H/manufacturers/<name>/ca.pem).

    The EST TLS server must load these as client-verification roots in addition to the
    fleet chain, or a device cannot present its birth certificate at all.
    """
    folder = manufacturers_dir(home)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*/{CA_CERT}") if p.is_file())


def load_trusted_manufacturers(home: Path) -> dict[str, x509.Certificate]:
    """The manufacturer CA certificates by name (folder); an unreadable file trusts nothing."""
    out: dict[str, x509.Certificate] = {}
    for path in trusted_manufacturer_ca_files(home):
        try:
            out[path.parent.name] = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            log.warning("manufacturer CA %s cannot be read; it is not trusted", path)
    return out


# (file, mtime_ns, size, inode) of each CA file: a change to any re-reads them all.
_Stamp = tuple[tuple[str, int, int, int], ...]


class TrustedManufacturers:
    """The manufacturer CAs of one home, as they are on disk now.

    `current()` looks at the files' metadata (a directory listing and a stat per CA, no
    parsing) and re-reads them when anything changed, so a removed CA file is no longer
    trusted by the next birth-certificate check. Each CA it finds is given to the TLS
    contexts passed in, for the handshake (the first call loads them all; `fleetpki serve`
    calls it every few seconds, so a CA added while it runs is trusted soon after). OpenSSL
    can add trust anchors to a live context but never remove one: a removed CA still
    completes a handshake, and is refused by the application's check (the service's).
    """

    def __init__(self, home: Path, tls_contexts: Sequence[ssl.SSLContext] = ()) -> None:
        self._home = Path(home)
        self._contexts = list(tls_contexts)
        self._lock = threading.Lock()
        self._stamp: _Stamp | None = None
        self._cas: dict[str, x509.Certificate] = {}
        self._loaded: set[bytes] = set()

    def _stamp_now(self) -> _Stamp:
        stamps = []
        for path in trusted_manufacturer_ca_files(self._home):
            try:
                st = path.stat()
            except OSError:
                continue
            stamps.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def current(self) -> dict[str, x509.Certificate]:
        """The trusted manufacturer CAs by name, as the files are now."""
        stamp = self._stamp_now()
        with self._lock:
            if stamp != self._stamp:
                self._cas = load_trusted_manufacturers(self._home)
                self._stamp = stamp
                self._extend_tls()
            return dict(self._cas)

    def _extend_tls(self) -> None:
        for cert in self._cas.values():
            der = cert.public_bytes(serialization.Encoding.DER)
            if der in self._loaded:
                continue
            self._loaded.add(der)
            for ctx in self._contexts:
                ctx.load_verify_locations(cadata=der)
