"""The operator HTTPS API: bearer auth, device listing, revoke/suspend/resume, batches, audit."""

from __future__ import annotations

import json

from enroll_server.est.wire import decode_certs_only
from enroll_server.registry import CertStatus, DeviceState
from fleetpki.identity import DeviceId
from tests.est_client import request
from tests.integration.test_est import enroll, leaf
from tests.live_server import LiveServer


def admin(
    server: LiveServer, method: str, path: str, body: dict | None = None, token: str | None = None
):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token if token is not None else server.admin_token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return request(server.est_url + path, server.client_ssl(), method, data, headers)


def test_admin_requires_bearer_token(live_server: LiveServer) -> None:
    r = request(live_server.est_url + "/admin/devices", live_server.client_ssl())
    assert r.status == 401 and "Bearer" in r.text
    r = admin(live_server, "GET", "/admin/devices", token="wrong")
    assert r.status == 401 and r.text == "admin token is not valid\n"


def test_list_show_and_revoke(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-adm")
    cert = leaf(decode_certs_only(enroll(live_server, "dev-adm", token).body))
    r = admin(live_server, "GET", "/admin/devices?state=active")
    assert r.status == 200
    assert [d["device_id"] for d in json.loads(r.body)["devices"]] == ["dev-adm"]
    shown = json.loads(admin(live_server, "GET", "/admin/devices/dev-adm").body)
    assert shown["certificates"][0]["serial"] == f"{cert.serial_number:x}"
    r = admin(live_server, "POST", "/admin/devices/dev-adm/revoke", {"reason": "key-compromise"})
    assert r.status == 200, r.text
    assert json.loads(r.body)["serials"] == [f"{cert.serial_number:x}"]
    rec = live_server.registry.get_certificate(cert.serial_number)
    assert rec is not None and rec.status is CertStatus.REVOKED
    assert rec.revocation_reason == "keyCompromise"
    audit = json.loads(admin(live_server, "GET", "/admin/audit?device=dev-adm").body)["audit"]
    assert any(e["action"].startswith("device.revoke") and e["actor"] == "admin-api" for e in audit)


def test_suspend_and_resume(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-sus")
    cert = leaf(decode_certs_only(enroll(live_server, "dev-sus", token).body))
    assert admin(live_server, "POST", "/admin/devices/dev-sus/suspend").status == 200
    dev = live_server.registry.get_device(DeviceId("dev-sus"))
    assert dev is not None and dev.state is DeviceState.SUSPENDED
    assert live_server.registry.get_certificate(cert.serial_number).status is CertStatus.ON_HOLD  # type: ignore[union-attr]
    assert admin(live_server, "POST", "/admin/devices/dev-sus/resume").status == 200
    assert live_server.registry.get_certificate(cert.serial_number).status is CertStatus.ACTIVE  # type: ignore[union-attr]


def test_bad_admin_input(live_server: LiveServer) -> None:
    live_server.mint_device("dev-in")
    r = admin(live_server, "POST", "/admin/devices/dev-in/revoke", {"reason": "because"})
    assert r.status == 400 and "revocation reason" in r.text
    dev = live_server.registry.get_device(DeviceId("dev-in"))
    assert dev is not None and dev.state is DeviceState.PROVISIONED  # nothing changed
    assert admin(live_server, "POST", "/admin/devices/nobody/revoke", {}).status == 404
    assert admin(live_server, "GET", "/admin/devices/bad%20id").status == 400
    r = request(
        live_server.est_url + "/admin/devices/dev-in/revoke",
        live_server.client_ssl(),
        "POST",
        b"{not json",
        {"Authorization": f"Bearer {live_server.admin_token}", "Content-Type": "application/json"},
    )
    assert r.status == 400 and "JSON" in r.text
    assert admin(live_server, "GET", "/admin/devices?limit=x").status == 400
    assert admin(live_server, "GET", "/admin/devices?state=sleeping").status == 400
