"""Service identities have the devices' lifecycle: issue (with a working client example), list,
show, renew (by the operator, or by the service over EST simplereenroll), revoke."""

from __future__ import annotations

import asyncio
import json
import shlex
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import KeyType, generate_key
from fleetpki.identity import SERVICE_URN_PREFIX
from tests.est_client import request
from tests.integration.broker_harness import (
    PAHO_ACCEPTED,
    PAHO_NOT_AUTHORIZED,
    Creds,
    PahoDevice,
    eventually,
)
from tests.integration.test_est import EST, b64, leaf
from tests.integration.test_renewal_lifecycle import enrolled, statuses
from tests.live_server import LiveServer
from tests.pki_helpers import csr_der, make_csr

runner = CliRunner()


def _creds(folder: Path, name: str) -> Creds:
    from enroll_server.pki.keys import load_private_key_pem

    cert = x509.load_pem_x509_certificates((folder / "cert.pem").read_bytes())[0]
    key = load_private_key_pem((folder / "key.pem").read_bytes(), None)
    return Creds(name, cert, key, folder / "cert.pem", folder / "key.pem")


async def test_service_issue_prints_an_example_that_works_and_renew_and_revoke(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    server = live_stack
    home = str(server.layout.root)
    r = runner.invoke(app, ["service", "issue", "backend", "--home", home])
    assert r.exit_code == 0, r.output
    assert "the MQTT client id must be 'backend'" in r.output
    (line,) = [x for x in r.output.splitlines() if x.strip().startswith("mosquitto_sub ")]
    argv = shlex.split(line)
    # The example names the configured port (8883); this test's broker listens elsewhere.
    argv[argv.index("-p") + 1] = str(server.mqtt_port)
    argv[argv.index("-h") + 1] = "127.0.0.1"
    assert argv[argv.index("-i") + 1] == "backend"
    sub = await asyncio.create_subprocess_exec(
        *argv, "-C", "1", "-W", "10", stdout=asyncio.subprocess.PIPE
    )
    device = enrolled(server, tmp_path, "dev-tele")
    publisher = PahoDevice(device.creds(), server.mqtt_port, server.layout.root_cert)
    try:
        assert await publisher.connect() == PAHO_ACCEPTED
        await eventually(lambda: "backend" in server.handle.broker.connected(), 5.0, "backend")  # type: ignore[union-attr]
        publisher.publish("devices/dev-tele/telemetry", b"21.5")
        out, _ = await asyncio.wait_for(sub.communicate(), 15)
    finally:
        await publisher.close()
    assert sub.returncode == 0 and out.decode().strip() == "devices/dev-tele/telemetry 21.5"

    # Issuing again says what to do instead.
    r = runner.invoke(app, ["service", "issue", "backend", "--home", home])
    assert r.exit_code == 2 and "fleetpki service renew backend" in r.output

    r = runner.invoke(app, ["service", "list", "--home", home, "--json"])
    (listed,) = json.loads(r.stdout)
    first_serial = int(listed["serial"], 16)
    assert listed["name"] == "backend" and listed["state"] == "active" and listed["renew_by"]

    folder = server.layout.root / "services" / "backend"
    r = runner.invoke(app, ["service", "renew", "backend", "--home", home])
    assert r.exit_code == 0, r.output
    assert f"supersedes {first_serial:x}" in r.output
    renewed = _creds(folder, "backend")
    assert statuses(server, "backend")[first_serial] == ("superseded", None)
    # The broker admits the renewed certificate: the old one is cut off.
    client = PahoDevice(renewed, server.mqtt_port, server.layout.root_cert)
    try:
        assert await client.connect() == PAHO_ACCEPTED
        await eventually(
            lambda: statuses(server, "backend")[first_serial] == ("revoked", "superseded"),
            3.0,
            "the old service certificate superseded",
        )
        r = runner.invoke(app, ["service", "revoke", "backend", "--home", home])
        assert r.exit_code == 0, r.output
        await eventually(lambda: not client.connected, 1.0, "the service's session dropped")
    finally:
        await client.close()
    shown = json.loads(
        runner.invoke(app, ["service", "show", "backend", "--home", home, "--json"]).stdout
    )
    assert shown["state"] == "revoked"
    assert {c["status"] for c in shown["certificates"]} == {"revoked"}
    assert await PahoDevice(renewed, server.mqtt_port, server.layout.root_cert).connect() in (
        PAHO_NOT_AUTHORIZED,
        None,
    )
    r = runner.invoke(app, ["service", "renew", "backend", "--home", home])
    assert r.exit_code == 2 and "the service is revoked" in r.output
    assert runner.invoke(app, ["service", "show", "dev-tele", "--home", home]).exit_code == 3


def test_a_service_renews_itself_over_est_with_its_current_certificate(
    live_server: LiveServer,
) -> None:
    from enroll_server.enrollment.identities import issue_service_identity

    server = live_server
    svc = issue_service_identity(server.layout.root, "svc-est", None, datetime.now(UTC))
    key = generate_key(KeyType.EC_P256)
    reply = request(
        server.est_url + EST + "/simplereenroll",
        server.client_ssl(svc.cert, svc.key),
        "POST",
        b64(csr_der(make_csr(key, "svc-est"))),
        {"Content-Type": "application/pkcs10"},
    )
    assert reply.status == 200, reply.text
    cert = leaf(decode_certs_only(reply.body))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        SERVICE_URN_PREFIX + "svc-est"
    ]
    assert statuses(server, "svc-est") == {
        svc.serial: ("superseded", None),
        cert.serial_number: ("active", None),
    }


def test_a_revoked_service_is_readmitted_with_a_new_key_and_never_gets_a_token(
    live_server: LiveServer,
) -> None:
    server = live_server
    home = str(server.layout.root)
    assert runner.invoke(app, ["service", "issue", "svc-back", "--home", home]).exit_code == 0
    folder = server.layout.root / "services" / "svc-back"
    first = _creds(folder, "svc-back").cert.serial_number
    r = runner.invoke(app, ["device", "rekey", "svc-back", "--home", home, "--stdout"])
    assert r.exit_code == 2 and "service renew|readmit svc-back" in r.output
    r = runner.invoke(app, ["service", "readmit", "svc-back", "--home", home])
    assert r.exit_code == 2 and "readmit is for revoked services" in r.output
    assert runner.invoke(app, ["service", "revoke", "svc-back", "--home", home]).exit_code == 0
    r = runner.invoke(app, ["service", "readmit", "svc-back", "--home", home])
    assert r.exit_code == 0, r.output
    again = _creds(folder, "svc-back").cert.serial_number
    assert statuses(server, "svc-back") == {
        first: ("revoked", "unspecified"),
        again: ("active", None),
    }
    # It renews over EST like any identity in good standing.
    reply = request(
        server.est_url + EST + "/simplereenroll",
        server.client_ssl(folder / "cert.pem", folder / "key.pem"),
        "POST",
        b64(csr_der(make_csr(generate_key(KeyType.EC_P256), "svc-back"))),
        {"Content-Type": "application/pkcs10"},
    )
    assert reply.status == 200, reply.text
