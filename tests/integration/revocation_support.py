"""Shared by the revocation integration tests: a registry with enrolled devices, files on disk."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.pki.keys import PrivateKey, private_key_pem
from enroll_server.registry import Registry
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa, issued_record


@dataclass
class Fleet:
    """A real registry in tmp_path and the certificates recorded in it."""

    ca: MemoryCa
    registry: Registry
    folder: Path
    certs: dict[str, tuple[x509.Certificate, PrivateKey]] = field(default_factory=dict)

    def enroll(self, device_id: str, now: datetime | None = None) -> x509.Certificate:
        """Register `device_id`, issue it a certificate and record it (as EST would)."""
        now = now or datetime.now(UTC)
        cert, key = self.ca.device_cert(device_id, now=now)
        did = DeviceId(device_id)
        if self.registry.get_device(did) is None:
            self.registry.add_device(did, now=now, actor="test")
        self.registry.record_issuance(
            issued_record(cert, device_id),
            consume_token_hash=None,
            supersedes_serial=None,
            now=now,
            actor="test",
        )
        self.certs[device_id] = (cert, key)
        return cert

    def cert_file(self, device_id: str) -> Path:
        cert, _ = self.certs[device_id]
        path = self.folder / f"{device_id}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def key_file(self, device_id: str) -> Path:
        _, key = self.certs[device_id]
        path = self.folder / f"{device_id}.key"
        path.write_bytes(private_key_pem(key, None))
        path.chmod(0o600)
        return path

    def chain_file(self) -> Path:
        path = self.folder / "chain.pem"
        path.write_bytes(self.ca.chain_pem())
        return path

    def issuing_file(self) -> Path:
        path = self.folder / "issuing.pem"
        path.write_bytes(self.ca.issuing.cert.public_bytes(serialization.Encoding.PEM))
        return path


async def run(*argv: str, timeout: float = 20) -> tuple[int, str]:
    """Run a real tool without blocking the event loop; (exit code, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for servers that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
