"""CRL and OCSP as `fleetpki serve` publishes them, checked with openssl and curl-like clients."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.home import load_home
from enroll_server.pki.ca import Issuer
from enroll_server.pki.keys import load_private_key_pem
from fleetpki.identity import DeviceId
from tests.integration.revocation_support import Fleet
from tests.pki_helpers import MemoryCa


def _fleet(server: Any, folder: Path) -> Fleet:
    loaded = load_home(server.layout.root)
    layout = loaded.layout
    root_key = load_private_key_pem(
        layout.root_key.read_bytes(), layout.passphrase_file.read_bytes().strip()
    )
    server_key = load_private_key_pem(layout.server_key.read_bytes(), None)
    server_cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    ca = MemoryCa(Issuer(loaded.root_cert, root_key), loaded.issuer, server_cert, server_key)
    return Fleet(ca, server.registry, folder)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


def test_serve_publishes_crl_and_answers_ocsp(live_server: Any, tmp_path: Path) -> None:
    fleet = _fleet(live_server, tmp_path)
    good = fleet.enroll("serve-good-1")
    bad = fleet.enroll("serve-bad-1")
    # The device's CRL Distribution Point is what the CRL's IDP names (scope check).
    cdp = good.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    crl = x509.load_der_x509_crl(_get(f"{live_server.http_url}/crl"))
    idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    assert list(idp.full_name or []) == list(cdp[0].full_name or [])

    # Revoked through the registry file, as the CLI does from another process.
    live_server.registry.revoke_device(
        DeviceId("serve-bad-1"), reason="keyCompromise", now=datetime.now(UTC), actor="test"
    )
    deadline = time.monotonic() + 5
    while True:
        pem = _get(f"{live_server.http_url}/crl.pem")
        crl = x509.load_pem_x509_crl(pem)
        if crl.get_revoked_certificate_by_serial_number(bad.serial_number) is not None:
            break
        assert time.monotonic() < deadline, "serve did not republish the CRL within 5 s"
        time.sleep(0.1)
    (tmp_path / "crl.pem").write_bytes(pem)
    chain = fleet.chain_file()
    for device, ok in (("serve-good-1", True), ("serve-bad-1", False)):
        crl_file, cert_file = str(tmp_path / "crl.pem"), str(fleet.cert_file(device))
        verify = subprocess.run(
            [
                "openssl",
                "verify",
                "-crl_check",
                "-CAfile",
                str(chain),
                "-CRLfile",
                crl_file,
                cert_file,
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert (verify.returncode == 0) is ok, verify.stdout + verify.stderr
        assert ok or "certificate revoked" in verify.stdout + verify.stderr

        ocsp_args = ["-url", f"{live_server.http_url}/ocsp", "-issuer", str(fleet.issuing_file())]
        answer = subprocess.run(
            ["openssl", "ocsp", *ocsp_args, "-CAfile", str(chain), "-cert", cert_file],
            capture_output=True,
            text=True,
            timeout=20,
        )
        out = answer.stdout + answer.stderr
        assert "Response verify OK" in out, out
        assert (": good" if ok else ": revoked") in out, out
    assert good.public_bytes(serialization.Encoding.DER)  # the good one was never listed
    assert crl.get_revoked_certificate_by_serial_number(good.serial_number) is None
