"""A bare EST simpleenroll server, for calibration only: `bench/enroll.py --server bare`.

The same TLS listener, TLS context, request-head parser and reply encoding as `fleetpki serve`,
but behind them only the raw floor's work: load and verify the CSR, build and sign the
certificate. No token check, no CSR policy, no registry, no metrics. It measures what the
transport and HTTP layer cost on their own, so BENCHMARKS.md can tell that cost apart from
what the service adds (authorization, policy, the registry commit).

    python bench/bare_est_server.py --home H --est-port P
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enroll_server.est.front import _HandOver, parse_head
from enroll_server.est.wire import encode_certs_only_der
from enroll_server.home.layout import load_home
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.transport.loop import install_fast_loop
from enroll_server.transport.tls_socket import TlsListener
from enroll_server.web.app import server_ssl_context
from fleetpki.identity import DeviceId

_HEAD_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
    b"Content-Transfer-Encoding: base64\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
)


class Calibration:
    """What every calibration server shares: its arguments, the server's TLS context, and
    the raw floor's work behind a request (also used by bench/minimal_est_server.py)."""

    def __init__(self) -> None:
        ap = argparse.ArgumentParser()
        ap.add_argument("--home", required=True)
        ap.add_argument("--est-port", type=int, required=True)
        args, _ = ap.parse_known_args()
        self.port: int = args.est_port
        loaded = load_home(Path(args.home))
        layout = loaded.layout
        self.tls = server_ssl_context(layout.server_cert, layout.server_key, layout.chain)
        self._issuer = loaded.issuer
        self._profile = DeviceProfile()
        self._issuer_der = loaded.issuer.cert.public_bytes(serialization.Encoding.DER)

    def reply(self, authorization: bytes, body: bytes) -> bytes | None:
        """The 200 reply for a base64 CSR body: load, verify, sign, encode (the floor's
        work and the reply's encoding); None if the CSR's signature is bad."""
        device = base64.b64decode(authorization.split()[1]).split(b":")[0]
        csr = x509.load_der_x509_csr(base64.b64decode(body))
        if not csr.is_signature_valid:
            return None
        cert = build_device_certificate(
            csr.public_key(),  # type: ignore[arg-type]
            DeviceId(device.decode()),
            self._issuer,
            datetime.now(UTC),
            self._profile,
        )
        out = encode_certs_only_der(
            (cert.public_bytes(serialization.Encoding.DER), self._issuer_der)
        )
        return _HEAD_OK % len(out) + out


def main() -> None:
    calibration = Calibration()

    class Bare(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                head = parse_head(self.buf[:end])
            except _HandOver:
                self.transport.abort()
                return
            body = self.buf[end + 4 :]
            if len(body) < head.length:
                return
            reply = calibration.reply((head.authorization or "").encode(), body)
            if reply is None:
                self.transport.abort()
                return
            self.transport.write(reply)
            self.transport.close()

    async def serve() -> None:
        listener = TlsListener(Bare, calibration.tls)
        listener.listen("127.0.0.1", calibration.port)
        await asyncio.Event().wait()

    install_fast_loop()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
