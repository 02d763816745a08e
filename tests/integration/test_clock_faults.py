"""Issue 18, campaign 4: `fleetpki serve` under Debian's libfaketime, its clock read from a file
the test rewrites (FAKETIME_TIMESTAMP_FILE, FAKETIME_NO_CACHE=1): it jumps back an hour, then
forward a day, while serving. Serials stay unique, each certificate's validity starts at the
server's clock of that moment, CRL thisUpdate/nextUpdate and OCSP producedAt follow the server's
clock, and the server keeps serving (BENCHMARKS.md, Faults / Clock faults)."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import HomeLayout, hash_secret, new_secret, registry_location
from enroll_server.registry import Registry
from fleetpki.identity import DeviceId
from tests.est_client import ask_ocsp, request
from tests.integration.test_batch_enroll import raw_enroll
from tests.live_server import make_home

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
# Certificates may be backdated a little for devices whose clock lags (the profile's skew
# allowance); a window this wide still tells the server's clock from the real one (an hour).
SLACK = timedelta(minutes=10)


@dataclass
class Served:
    proc: subprocess.Popen[str]
    est_url: str
    http_url: str
    root_cert: Path

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root_cert))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Served, Path, Path]]:
    if not LIBFAKETIME.exists():
        pytest.skip(f"{LIBFAKETIME} missing (Debian's faketime package)")
    layout = make_home(tmp_path / "home")
    control = tmp_path / "faketime"
    control.write_text("+0\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(control),
        "FAKETIME_NO_CACHE": "1",
        # A wall-clock jump (settimeofday, NTP stepping) leaves CLOCK_MONOTONIC alone: only
        # the real time jumps here, as on a device server whose clock is stepped.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(layout.root),
         "--est-port", "0", "--http-port", "0", "--admin-port", "0", "--no-broker"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        urls: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "fleetpki.server: EST on" in line:
                urls = re.findall(r"https?://127\.0\.0\.1:\d+", line)
                break
        assert urls, "serve did not start"
        yield Served(proc, urls[0], urls[1], layout.root_cert), control, layout.root
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


def test_clock_jumps_back_an_hour_and_forward_a_day(
    served: tuple[Served, Path, Path],
) -> None:
    server, control, home = served
    issuer = x509.load_pem_x509_certificate((home / "ca" / "issuing.pem").read_bytes())
    serials: list[int] = []
    with Registry.open(registry_location(HomeLayout(home))) as registry:
        for step, offset in enumerate((timedelta(0), timedelta(hours=-1), timedelta(days=1))):
            control.write_text(faketime_offset(offset))
            server_now = datetime.now(UTC) + offset
            device = f"dev-{step}"
            now = datetime.now(UTC)
            registry.add_device(DeviceId(device), batch_id=None, now=now, actor="test")
            token = new_secret()
            registry.add_token(DeviceId(device), hash_secret(token), now + timedelta(days=7), now)
            reply = raw_enroll(server, device, token)  # type: ignore[arg-type]  # duck-typed: est_url, client_ssl
            assert reply.status == 200, (offset, reply.status, reply.text)
            (cert,) = [
                c
                for c in decode_certs_only(reply.body)
                if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            ]
            serials.append(cert.serial_number)
            # Validity follows the server's clock of the moment, not the real one.
            assert abs(cert.not_valid_before_utc - server_now) < SLACK, (offset, cert)
            assert cert.not_valid_after_utc > server_now
            # The CRL: signed at the server's time, next update after this update.
            crl = x509.load_der_x509_crl(request(server.http_url + "/crl", None).body)
            assert crl.next_update_utc is not None
            assert crl.next_update_utc > crl.last_update_utc
            # OCSP: produced now by the server's clock, the certificate good.
            status = ask_ocsp(server.http_url, cert, issuer)
            assert status.certificate_status == ocsp.OCSPCertStatus.GOOD
            assert abs(status.produced_at_utc - server_now) < SLACK, (
                offset,
                status.produced_at_utc,
            )
            assert status.next_update_utc is None or status.next_update_utc > status.this_update_utc
    assert len(set(serials)) == len(serials) == 3
    assert server.proc.poll() is None, "serve crashed"


def faketime_offset(offset: timedelta) -> str:
    """libfaketime's relative format: '+0', '-3600s', '+86400s'."""
    seconds = int(offset.total_seconds())
    return f"{seconds:+d}s\n" if seconds else "+0\n"
