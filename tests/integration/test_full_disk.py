"""Issue 18, campaign 3: the home on a 4 MiB tmpfs, filled up while devices enroll and a batch is
created. Enrollments get 503 with Retry-After and nothing half-written (token not burned, no
certificate row); CRL and OCSP keep answering; `fleetpki batch create` fails naming the disk,
exit 1, leaving nothing; once the filler is deleted the same token enrolls."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import hash_secret
from fleetpki.identity import DeviceId
from tests.est_client import ask_ocsp, request
from tests.integration.test_batch_enroll import raw_enroll
from tests.live_server import start_live_server

EST = "/.well-known/est"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own, unmounted in teardown."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros until the filesystem refuses (ENOSPC); returns the filler."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        # The last partial pages too, a byte at a time would be slow: 4 KiB then bytes.
        for size in (4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def fleetpki(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_full_disk_refuses_for_now_and_recovers_by_itself(disk: Path) -> None:
    server = start_live_server(disk / "home")
    try:
        # A first enrollment before the disk fills: a certificate to ask OCSP about.
        first = raw_enroll(server, "dev-a", server.mint_device("dev-a"))
        assert first.status == 200, first.text
        (cert,) = [
            c
            for c in decode_certs_only(first.body)
            if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        ]
        tokens = {d: server.mint_device(d) for d in ("dev-b", "dev-c", "dev-d")}

        filler = fill(disk)
        for device, token in tokens.items():
            reply = raw_enroll(server, device, token)
            assert reply.status == 503, (device, reply.status, reply.text)
            assert int(reply.headers["retry-after"]) > 0
            assert "space" in reply.text or "full" in reply.text, reply.text
            # Nothing half-written: the token is not burned, no certificate row.
            assert server.registry.certificates_of(DeviceId(device)) == []
            server.registry.check_token(DeviceId(device), hash_secret(token), datetime.now(UTC))
        # CRL and OCSP keep answering from what is in memory and on disk.
        crl = request(server.http_url + "/crl", None)
        assert crl.status == 200
        x509.load_der_x509_crl(crl.body)
        issuer = x509.load_pem_x509_certificate(server.layout.issuing_cert.read_bytes())
        status = ask_ocsp(server.http_url, cert, issuer)
        assert status.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert status.certificate_status == ocsp.OCSPCertStatus.GOOD

        # A batch on the full filesystem: refused naming the disk, exit 1, nothing left.
        lot = disk / "lot"
        done = fleetpki(
            "batch", "create", "--home", str(server.layout.root), "-n", "3", "--out", str(lot)
        )
        assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
        assert "no space left on" in done.stderr.lower(), done.stderr
        assert not lot.exists()
        assert server.registry.list_batches() == []

        # Space again: the same tokens enroll, with no restart.
        filler.unlink()
        for device, token in tokens.items():
            reply = raw_enroll(server, device, token)
            assert reply.status == 200, (device, reply.status, reply.text)
        done = fleetpki(
            "batch", "create", "--home", str(server.layout.root), "-n", "3", "--out", str(lot)
        )
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in lot.iterdir() if p.is_dir()) == [
            "dev-000001",
            "dev-000002",
            "dev-000003",
        ]
    finally:
        server.stop()
