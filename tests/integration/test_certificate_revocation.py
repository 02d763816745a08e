"""Per-certificate revocation, re-key and readmit, through the admin API and the CLI, against
the running service and its embedded broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cryptography import x509
from cryptography.x509 import ocsp
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.registry import DeviceState
from fleetpki.identity import DeviceId
from tests.integration.broker_harness import PAHO_ACCEPTED, PahoDevice, eventually
from tests.integration.test_admin_api import admin
from tests.integration.test_renewal_lifecycle import (
    crl_reasons,
    enrolled,
    ocsp_status,
    reenroll,
    renewed,
    statuses,
)
from tests.live_server import LiveServer

runner = CliRunner()


async def _dropped_within_a_second(client: PahoDevice) -> None:
    started = time.monotonic()
    await eventually(lambda: not client.connected, 3.0, "the session dropped")
    assert time.monotonic() - started < 1.0


async def test_admin_api_revokes_one_certificate_and_rekeys_the_device(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    server = live_stack
    a = enrolled(server, tmp_path, "dev-one")
    b = renewed(server, a, tmp_path)
    session = PahoDevice(b.creds(), server.mqtt_port, server.layout.root_cert)
    try:
        assert await session.connect() == PAHO_ACCEPTED
        r = admin(server, "POST", f"/admin/certificates/{b.serial:x}/revoke", {"reason": "x"})
        assert r.status == 400 and "not a revocation reason" in r.text
        r = admin(
            server, "POST", f"/admin/certificates/{b.serial:x}/revoke", {"reason": "key-compromise"}
        )
        assert r.status == 200, r.text
        assert json.loads(r.text) == {"device_id": "dev-one", "revoked": [f"{b.serial:x}"]}
        await _dropped_within_a_second(session)
    finally:
        await session.close()
    assert crl_reasons(server, [b.serial]) == {b.serial: x509.ReasonFlags.key_compromise}
    assert ocsp_status(server, b.cert).revocation_reason is x509.ReasonFlags.key_compromise
    refused = reenroll(server, b)
    assert refused.status == 403 and "needs a re-key (fleetpki device rekey)" in refused.text
    assert server.registry.get_device(DeviceId("dev-one")).state is DeviceState.ACTIVE  # type: ignore[union-attr]
    shown = json.loads(admin(server, "GET", f"/admin/certificates/{b.serial:x}").text)
    assert shown["status"] == "revoked" and shown["revocation_reason"] == "keyCompromise"
    assert admin(server, "POST", "/admin/certificates/abc123/revoke", {}).status == 404
    assert admin(server, "POST", "/admin/certificates/not-hex/revoke", {}).status == 400

    # The device has no valid certificate left: re-key it.
    r = admin(server, "POST", "/admin/devices/dev-one/rekey", {"token_ttl": "1d"})
    assert r.status == 200, r.text
    token = json.loads(r.text)["token"]
    fresh = enrolled(server, tmp_path / "fresh", "dev-one", token)
    assert statuses(server, "dev-one")[fresh.serial] == ("active", None)
    assert admin(server, "POST", "/admin/devices/dev-one/readmit", {}).status == 409


async def test_cli_revokes_a_certificate_rekeys_and_readmits_a_device(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    server = live_stack
    home = str(server.layout.root)
    a = enrolled(server, tmp_path, "dev-cli")
    session = PahoDevice(a.creds(), server.mqtt_port, server.layout.root_cert)
    try:
        assert await session.connect() == PAHO_ACCEPTED
        r = runner.invoke(app, ["cert", "revoke", f"{a.serial:x}", "--home", home])
        assert r.exit_code == 0, r.output
        assert "dev-cli: revoked" in r.output and "unspecified" in r.output
        await _dropped_within_a_second(session)
    finally:
        await session.close()
    r = runner.invoke(app, ["cert", "revoke", f"{a.serial:x}", "--home", home])
    assert r.exit_code == 0 and "already revoked: nothing to do" in r.output
    assert runner.invoke(app, ["cert", "revoke", "zz", "--home", home]).exit_code == 2
    assert runner.invoke(app, ["cert", "revoke", "abc", "--home", home]).exit_code == 3
    r = runner.invoke(app, ["cert", "show", f"{a.serial:x}", "--home", home, "--json"])
    assert r.exit_code == 0 and '"status": "revoked"' in r.output

    # Re-key: a new token on stdout (and only it), every certificate cut off.
    b = enrolled(server, tmp_path / "b", "dev-cli", server_token(server, "dev-cli"))
    r = runner.invoke(app, ["device", "rekey", "dev-cli", "--home", home, "--stdout"])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip()
    assert statuses(server, "dev-cli")[b.serial] == ("revoked", "superseded")
    assert reenroll(server, b).status == 403
    c = enrolled(server, tmp_path / "c", "dev-cli", token)

    # A mistaken revoke, and the way back: a new token; the revoked ones stay revoked.
    assert runner.invoke(app, ["device", "revoke", "dev-cli", "--home", home]).exit_code == 0
    r = runner.invoke(app, ["device", "rekey", "dev-cli", "--home", home, "--stdout"])
    assert r.exit_code == 2 and "device readmit" in r.output
    r = runner.invoke(app, ["device", "readmit", "dev-cli", "--home", home, "--stdout"])
    assert r.exit_code == 0, r.output
    d = enrolled(server, tmp_path / "d", "dev-cli", r.stdout.strip())
    assert ocsp_status(server, c.cert).certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert ocsp_status(server, d.cert).certificate_status is ocsp.OCSPCertStatus.GOOD
    audit = [e.action for e in server.registry.audit_log(device_id=DeviceId("dev-cli"))]
    assert {"device.rekey", "device.readmit", "certificate.revoke"} <= set(audit)
    r = runner.invoke(app, ["device", "readmit", "dev-cli", "--home", home, "--stdout"])
    assert r.exit_code == 2 and "readmit is for revoked devices" in r.output


def server_token(server: LiveServer, device_id: str) -> str:
    """What `batch reissue-token --force --stdout` hands out: a new token for the device."""
    r = runner.invoke(
        app,
        [
            "batch",
            "reissue-token",
            device_id,
            "--home",
            str(server.layout.root),
            "--stdout",
            "--force",
        ],
    )
    assert r.exit_code == 0, r.output
    return r.stdout.strip()
