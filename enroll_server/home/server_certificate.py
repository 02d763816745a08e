"""The running listeners' TLS server certificate: reloaded when its files change, renewed when due.

Every device checks the broker's and the EST server's certificate on every connection. Once
it expires (397 days after `fleetpki init`) the whole fleet fails its handshakes at once and
cannot even re-enroll to recover, so a server certificate that depends on an operator's
calendar is a fleet outage waiting for its date. `fleetpki serve` holds the online issuing
CA anyway, so it renews its own certificate at two thirds of its lifetime, as agents do with
theirs (the margin leaves months for anything to go wrong and be seen); `fleetpki
server-cert renew` does it by hand (new host names, a suspected key compromise). Either way
the new pair is loaded into the live TLS contexts, the EST + admin listener's and the
broker's, without a restart: new handshakes present it, open connections keep theirs.

The files may change under us (another process renews), and OpenSSL drops the certificate of
a context whose new key does not match it (ssl_set_pkey), which would fail every later
handshake. So a pair is loaded only after it is read once, checked to match with
cryptography, and written to private copies that only this process writes: the live
contexts load those, never files that may be half-replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetpki.atomic_file import write_atomic

log = logging.getLogger("fleetpki.tls")

CHECK_INTERVAL = 60.0  # seconds between looks at the files and the clock
# Seconds between renewal attempts while the certificate stays due: a failed renewal, or one
# whose pair does not load, is retried, but does not mint a certificate every minute.
RETRY_AFTER = 600.0
RENEW_AT = 2 / 3  # of the lifetime, as the agent renews device certificates


class ServerCertificateError(Exception):
    """A server certificate/key pair that cannot be used; `reason` names the file and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def renewal_due_at(cert: x509.Certificate) -> datetime:
    """When a server certificate is to be renewed: at RENEW_AT of its lifetime."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * RENEW_AT


def read_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes, x509.Certificate]:
    """The PEM of a certificate chain and its key, read once, with the leaf certificate;
    ServerCertificateError unless the key is the leaf's (RFC 5280 4.1.2.7 subject key)."""
    try:
        chain_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except OSError as exc:
        raise ServerCertificateError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ServerCertificateError(f"{cert_path} or {key_path} is not PEM: {exc}") from exc
    if key.public_key() != leaf.public_key():
        raise ServerCertificateError(f"{key_path} is not the key of {cert_path}")
    return chain_pem, key_pem, leaf


class ServerCertificates:
    """Keeps the TLS server certificate of some live SSLContexts current (see module doc).

    `renew(now)`, if given, writes a new pair to the files (home.renew_server_certificate);
    it runs in a worker thread (key generation and signing) once the certificate is due.
    """

    def __init__(
        self,
        cert_path: Path,
        key_path: Path,
        contexts: Sequence[ssl.SSLContext],
        clock: Callable[[], datetime],
        renew: Callable[[datetime], object] | None = None,
        interval: float = CHECK_INTERVAL,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.contexts = list(contexts)
        self.clock = clock
        self.renew = renew
        self.interval = interval
        self.retry_after = retry_after
        self._next_attempt = 0.0  # time.monotonic() before which no renewal is tried
        # Stamp, read and load now: the contexts were built from the files a moment ago, and a
        # pair renewed in between would otherwise match the stamp and never be loaded.
        self._stamp = self._files_stamp()
        chain_pem, key_pem, self.current = read_pair(cert_path, key_path)
        self._load(chain_pem, key_pem)
        self.reloads = 0
        self.renewals = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when either file is replaced (write_atomic renames a new inode in)."""
        stamps = []
        for path in (self.cert_path, self.key_path):
            try:
                st = path.stat()
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Load the files' pair into every context if they changed and match; True if loaded.

        A pair that does not load (caught mid-renewal, or broken by hand) leaves the contexts
        as they are, is logged, and is tried again at the next check.
        """
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return False
        try:
            chain_pem, key_pem, leaf = read_pair(self.cert_path, self.key_path)
            self._load(chain_pem, key_pem)
        except ServerCertificateError as exc:
            self.failures += 1
            log.warning("TLS server certificate not reloaded, the current one stays: %s", exc)
            return False
        self._stamp = stamp
        self.current = leaf
        self.reloads += 1
        log.info(
            "TLS server certificate reloaded: serial %x, valid until %s",
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(),
        )
        return True

    def _load(self, chain_pem: bytes, key_pem: bytes) -> None:
        """Load one checked pair into a scratch context, then into the live ones, from
        private copies (load_cert_chain reads paths, and the real files may change)."""
        folder = self.key_path.parent
        cert_copy = folder / f".loading-{os.getpid()}.pem"
        key_copy = folder / f".loading-{os.getpid()}.key"
        try:
            write_atomic(cert_copy, chain_pem)
            write_atomic(key_copy, key_pem)  # 0600, beside the real key
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    cert_copy, key_copy
                )
            except (ssl.SSLError, OSError) as exc:
                raise ServerCertificateError(f"{self.cert_path}: {exc}") from exc
            for ctx in self.contexts:
                ctx.load_cert_chain(cert_copy, key_copy)
        finally:
            for copy in (cert_copy, key_copy):
                with contextlib.suppress(FileNotFoundError):
                    copy.unlink()

    async def check(self) -> None:
        """One look: reload a changed pair; renew if the certificate is due (then reload)."""
        self.reload_if_changed()
        now = self.clock()
        if self.renew is None or now < renewal_due_at(self.current):
            return
        if time.monotonic() < self._next_attempt:
            return
        self._next_attempt = time.monotonic() + self.retry_after
        log.info(
            "TLS server certificate serial %x is past %d%% of its lifetime (until %s): renewing",
            self.current.serial_number,
            round(RENEW_AT * 100),
            self.current.not_valid_after_utc.isoformat(),
        )
        try:
            await asyncio.to_thread(self.renew, now)
        except Exception:
            self.failures += 1
            log.exception("TLS server certificate renewal failed; will try again")
            return
        self.renewals += 1
        self.reload_if_changed()

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # never let the keeper die: the next check may succeed
                self.failures += 1
                log.exception("TLS server certificate check failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self.run(), name="fleetpki-server-certificate"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def metrics_text(self) -> str:
        """Prometheus lines: when the certificate expires and is due, reloads, failures."""
        return (
            "# HELP fleetpki_server_certificate_not_after_seconds When the TLS server "
            "certificate in use expires (Unix time).\n"
            "# TYPE fleetpki_server_certificate_not_after_seconds gauge\n"
            "fleetpki_server_certificate_not_after_seconds "
            f"{self.current.not_valid_after_utc.timestamp():.0f}\n"
            "# HELP fleetpki_server_certificate_renew_at_seconds When it is due for renewal.\n"
            "# TYPE fleetpki_server_certificate_renew_at_seconds gauge\n"
            "fleetpki_server_certificate_renew_at_seconds "
            f"{renewal_due_at(self.current).timestamp():.0f}\n"
            "# HELP fleetpki_server_certificate_reloads_total New pairs loaded without restart.\n"
            "# TYPE fleetpki_server_certificate_reloads_total counter\n"
            f"fleetpki_server_certificate_reloads_total {self.reloads}\n"
            "# HELP fleetpki_server_certificate_failures_total Failed reloads and renewals.\n"
            "# TYPE fleetpki_server_certificate_failures_total counter\n"
            f"fleetpki_server_certificate_failures_total {self.failures}\n"
        )
