"""The running service publishes revocations made through it on /crl and /ocsp at once."""

from __future__ import annotations

import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from enroll_server.est.wire import decode_certs_only
from tests.est_client import request
from tests.integration.test_admin_api import admin
from tests.integration.test_est import enroll, leaf
from tests.live_server import LiveServer


def test_admin_revoke_reaches_crl_and_ocsp(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-crl")
    cert = leaf(decode_certs_only(enroll(live_server, "dev-crl", token).body))
    issuer = live_server.handle.home.issuer.cert
    crl = x509.load_der_x509_crl(request(live_server.http_url + "/crl", None).body)
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is None
    assert (
        admin(
            live_server, "POST", "/admin/devices/dev-crl/revoke", {"reason": "key-compromise"}
        ).status
        == 200
    )
    deadline = time.monotonic() + 5
    while True:
        crl = x509.load_der_x509_crl(request(live_server.http_url + "/crl", None).body)
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert entry is not None
    assert crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    r = request(
        live_server.http_url + "/ocsp",
        None,
        "POST",
        req.public_bytes(serialization.Encoding.DER),
        {"Content-Type": "application/ocsp-request"},
    )
    resp = ocsp.load_der_ocsp_response(r.body)
    assert resp.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.key_compromise
