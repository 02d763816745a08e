"""CRL and OCSP as `fleetpki serve` publishes them, checked with openssl and curl-like clients."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from enroll_server.home.layout import load_home
from enroll_server.pki.ca import Issuer
from enroll_server.pki.keys import load_private_key_pem
from enroll_server.revocation.routes import OCSP_REQUEST_TYPE
from fleetpki.identity import DeviceId
from tests.integration.revocation_support import Fleet
from tests.pki_helpers import MemoryCa, ocsp_request_for_negative_serial


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


def _ocsp_request(fleet: Fleet, cert: x509.Certificate) -> bytes:
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, fleet.ca.issuing.cert, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def _raw_exchange(port: int, parts: list[bytes], pause: float) -> bytes:
    """Send `parts` as separate TCP segments `pause` seconds apart; the whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause)
            sock.sendall(part)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_ocsp_post_split_across_segments_is_answered(live_server: Any, tmp_path: Path) -> None:
    # One read() returns what has arrived: the handler used to answer the first half alone
    # (malformedRequest). It must read to Content-Length.
    fleet = _fleet(live_server, tmp_path)
    cert = fleet.enroll("serve-split-1")
    body = _ocsp_request(fleet, cert)
    head = (
        "POST /ocsp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/ocsp-request\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    half = len(body) // 2
    reply = _raw_exchange(live_server.handle.http_port, [head + body[:half], body[half:]], 0.3)
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", reply[:200]
    resp = ocsp.load_der_ocsp_response(rest.partition(b"\r\n\r\n")[2])
    assert resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert resp.serial_number == cert.serial_number


def _post(url: str, body: bytes, content_type: str | None) -> tuple[int, str, bytes]:
    headers = {} if content_type is None else {"Content-Type": content_type}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.headers.get_content_type(), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), bytes(exc.read())


def test_ocsp_post_requires_the_ocsp_request_content_type(live_server: Any, tmp_path: Path) -> None:
    fleet = _fleet(live_server, tmp_path)
    body = _ocsp_request(fleet, fleet.enroll("serve-ctype-1"))
    url = f"{live_server.http_url}/ocsp"
    # urllib sends application/x-www-form-urlencoded when no type is given.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        status, ctype, text = _post(url, body, content_type)
        assert status == 415, (content_type, status)
        assert ctype == "text/plain"
        assert b"send application/ocsp-request" in text, text
    # Parameters and case do not matter (RFC 9110 8.3.1).
    status, ctype, der = _post(url, body, "Application/OCSP-Request; charset=binary")
    assert (status, ctype) == (200, "application/ocsp-response")
    assert ocsp.load_der_ocsp_response(der).certificate_status is ocsp.OCSPCertStatus.GOOD


def test_ocsp_negative_serial_is_malformed_without_a_traceback(
    live_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = _fleet(live_server, tmp_path)
    der = ocsp_request_for_negative_serial(fleet.ca.issuing.cert)
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            status, _, body = _post(f"{live_server.http_url}/ocsp", der, OCSP_REQUEST_TYPE)
            assert status == 200
            resp = ocsp.load_der_ocsp_response(body)
            assert resp.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert live_server.handle.revocation.outcomes["internalError"] == 0


def _verify_all(fleet: Fleet, crl_pems: list[bytes], device: str, folder: Path) -> tuple[int, str]:
    crls = folder / "crls.pem"
    crls.write_bytes(b"".join(crl_pems))
    argv = ["openssl", "verify", "-crl_check_all", "-CAfile", str(fleet.chain_file())]
    if crl_pems:
        argv += ["-CRLfile", str(crls)]
    done = subprocess.run(
        [*argv, str(fleet.cert_file(device))], capture_output=True, text=True, timeout=20
    )
    return done.returncode, done.stdout + done.stderr


def test_the_whole_chain_checks_against_published_crls(live_server: Any, tmp_path: Path) -> None:
    # openssl verify -crl_check_all wants a CRL from every CA of the chain: the root's is
    # published beside the issuing CA's, and the issuing CA certificate points at it.
    fleet = _fleet(live_server, tmp_path)
    fleet.enroll("serve-chain-1")
    cdp = fleet.ca.issuing.cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    urls = [n.value for n in cdp.value[0].full_name or []]
    assert urls == [live_server.handle.home.config.urls().root_crl]
    assert urls[0].endswith("/root.crl")

    root_crl = x509.load_der_x509_crl(_get(f"{live_server.http_url}/root.crl"))
    assert root_crl.issuer == fleet.ca.root.cert.subject
    assert root_crl.is_signature_valid(fleet.ca.root.cert.public_key())
    idp = root_crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    assert idp.only_contains_ca_certs and idp.full_name is None
    assert len(root_crl) == 0
    issuing_crl = _get(f"{live_server.http_url}/crl.pem")
    root_pem = root_crl.public_bytes(serialization.Encoding.PEM)

    code, out = _verify_all(fleet, [issuing_crl, root_pem], "serve-chain-1", tmp_path)
    assert code == 0 and ": OK" in out, out
    # Without the root's CRL the same check fails: that is what the endpoint is for.
    code, out = _verify_all(fleet, [issuing_crl], "serve-chain-1", tmp_path)
    assert code != 0 and "unable to get certificate CRL" in out, out


def test_root_crl_is_made_for_older_homes_and_re_signed_at_half_life(tmp_path: Path) -> None:
    from enroll_server.home.layout import ROOT_CRL_LIFETIME
    from enroll_server.home.root import root_crl
    from tests.live_server import make_home

    layout = make_home(tmp_path / "home")
    first = x509.load_der_x509_crl(layout.root_crl.read_bytes())  # written by init
    number = first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    now = datetime.now(UTC)
    assert root_crl(layout, now).public_bytes(serialization.Encoding.DER) == (
        layout.root_crl.read_bytes()
    )  # not due: the same file
    later = root_crl(layout, now + ROOT_CRL_LIFETIME * 0.6)
    assert later.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    assert later.next_update_utc is not None and later.next_update_utc > now + ROOT_CRL_LIFETIME
    layout.root_crl.unlink()  # a home made before the root published a CRL
    remade = root_crl(layout, now)
    assert layout.root_crl.exists() and len(remade) == 0
    root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
    assert remade.is_signature_valid(root.public_key())
