"""Machine-readable error codes on the wire (`Fleetpki-Error`), from both HTTP layers (the lean
front end and aiohttp), and `GET /device/status`: what a device is told it is, over mTLS."""

from __future__ import annotations

import http.client
import inspect
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enroll_server import errors
from enroll_server.pki.keys import KeyType, generate_key
from fleetpki.error_codes import ERROR_HEADER, ErrorCode
from fleetpki.identity import DeviceId
from tests.est_client import Reply, basic, request
from tests.integration.test_est import EST, _enrolled, b64, reenroll
from tests.live_server import LiveServer
from tests.pki_helpers import csr_der, make_csr

STATUS = "/device/status"
HEADER = ERROR_HEADER.lower()
PKCS10 = "application/pkcs10"


def test_every_service_error_has_its_own_row() -> None:
    """Each class of the tree is in the one table, so none answers with a borrowed code."""
    classes = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ServiceError) and cls is not errors.RetryLater
    }
    assert classes - set(errors.ERRORS) == set()
    codes = [code for _, code in errors.ERRORS.values()]
    assert set(codes) == set(ErrorCode)


def post_enroll(
    server: LiveServer, device: str, token: str, content_type: str, chunked: bool = False
) -> Reply:
    """simpleenroll; chunked, the front end hands it to aiohttp, which must answer the same."""
    body = b64(csr_der(make_csr(generate_key(KeyType.EC_P256), device)))
    headers = {**basic(device, token), "Content-Type": content_type}
    if not chunked:
        url = server.est_url + EST + "/simpleenroll"
        return request(url, server.client_ssl(), "POST", body, headers)
    conn = http.client.HTTPSConnection(
        "127.0.0.1", server.handle.est_port, context=server.client_ssl(), timeout=15
    )
    try:
        conn.request(
            "POST", EST + "/simpleenroll", body=iter([body]), headers=headers, encode_chunked=True
        )
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def test_suspended_and_revoked_say_which_on_both_http_layers(live_server: LiveServer) -> None:
    now = datetime.now(UTC)
    suspended_token = live_server.mint_device("dev-susp")
    live_server.registry.suspend_device(DeviceId("dev-susp"), now=now, actor="test")
    revoked_token = live_server.mint_device("dev-rev")
    live_server.registry.revoke_device(
        DeviceId("dev-rev"), reason="keyCompromise", now=now, actor="test"
    )
    for chunked in (False, True):
        r = post_enroll(live_server, "dev-susp", suspended_token, PKCS10, chunked)
        assert (r.status, r.headers[HEADER]) == (403, "device-suspended"), r.text
        assert r.text == "device dev-susp is suspended\n"  # the one line for people stays
        r = post_enroll(live_server, "dev-rev", revoked_token, PKCS10, chunked)
        assert (r.status, r.headers[HEADER]) == (403, "device-revoked"), r.text
        r = post_enroll(live_server, "dev-rev", "wrong-token", PKCS10, chunked)
        assert (r.status, r.headers[HEADER]) == (401, "authentication-failed")
        assert r.headers["www-authenticate"].startswith("Basic ")


@pytest.mark.parametrize("chunked", [False, True])
def test_415_is_in_the_table_on_both_http_layers(live_server: LiveServer, chunked: bool) -> None:
    token = live_server.mint_device("dev-ct")
    r = post_enroll(live_server, "dev-ct", token, "application/json", chunked)
    assert (r.status, r.headers[HEADER]) == (415, "unsupported-media-type")
    assert "application/pkcs10" in r.text
    # Nothing was spent: the token still enrolls, and a success carries no error code.
    r = post_enroll(live_server, "dev-ct", token, PKCS10, chunked)
    assert r.status == 200 and HEADER not in r.headers


def device_status(server: LiveServer, cert: Path | None, key: Path | None) -> Reply:
    return request(server.est_url + STATUS, server.client_ssl(cert, key))


def test_device_status_follows_suspend_resume_revoke(
    live_server: LiveServer, tmp_path: Path
) -> None:
    cert_path, key_path, cert = _enrolled(live_server, tmp_path, "dev-st")
    device = DeviceId("dev-st")
    r = device_status(live_server, cert_path, key_path)
    assert r.status == 200, r.text
    assert json.loads(r.body) == {
        "device": "dev-st",
        "state": "active",
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }

    live_server.registry.suspend_device(device, now=datetime.now(UTC), actor="test")
    r = device_status(live_server, cert_path, key_path)
    assert (r.status, r.headers[HEADER]) == (403, "device-suspended")
    # simplereenroll answers the same, and issues nothing.
    r = reenroll(live_server, cert_path, key_path, "dev-st")
    assert (r.status, r.headers[HEADER]) == (403, "device-suspended")

    live_server.registry.resume_device(device, now=datetime.now(UTC), actor="test")
    assert device_status(live_server, cert_path, key_path).status == 200

    live_server.registry.revoke_device(
        device, reason="keyCompromise", now=datetime.now(UTC), actor="test"
    )
    r = device_status(live_server, cert_path, key_path)
    assert (r.status, r.headers[HEADER]) == (403, "device-revoked")
    assert len(live_server.registry.certificates_of(device)) == 1  # read-only


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_device_status_needs_a_client_certificate(live_server: LiveServer, method: str) -> None:
    r = request(live_server.est_url + STATUS, live_server.client_ssl(), method)
    if method == "POST":
        assert r.status == 405  # read-only
        return
    assert (r.status, r.headers[HEADER]) == (403, "forbidden")
    assert "client authentication" in r.text
