"""The whole path: EST enrollment -> mTLS MQTT -> telemetry to a service -> revoke -> dropped."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from enroll_server.enrollment.identities import issue_service_identity
from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import KeyType, generate_key, private_key_pem
from tests.integration.test_admin_api import admin
from tests.integration.test_est import enroll, leaf
from tests.live_server import LiveServer


class Peer:
    """A paho client on its own network thread, recording what happens to it."""

    def __init__(self, client_id: str, ca: Path, cert: Path, key: Path, port: int) -> None:
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.refused: object = None
        self.disconnected_at = 0.0
        self.messages: list[tuple[str, bytes]] = []
        self.got_message = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        self.port = port

    def _on_connect(self, client, userdata, flags, rc, props=None):  # type: ignore[no-untyped-def]
        if rc.is_failure:
            self.refused = rc
        else:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, rc, props=None):  # type: ignore[no-untyped-def]
        self.disconnected_at = time.monotonic()
        self.disconnected.set()

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        self.messages.append((msg.topic, msg.payload))
        self.got_message.set()

    def start(self) -> Peer:
        self.client.connect("localhost", self.port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def enrolled_device(server: LiveServer, tmp_path: Path, device: str) -> tuple[Path, Path]:
    key = generate_key(KeyType.EC_P256)
    r = enroll(server, device, server.mint_device(device), key)
    assert r.status == 200, r.text
    cert = leaf(decode_certs_only(r.body))
    folder = tmp_path / device
    folder.mkdir()
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(private_key_pem(key, None))
    return folder / "cert.pem", folder / "key.pem"


def wait(event: threading.Event, what: str, timeout: float = 10) -> None:
    assert event.wait(timeout), f"timed out waiting for {what}"


def test_enroll_connect_telemetry_revoke_drop(live_stack: LiveServer, tmp_path: Path) -> None:
    ca = live_stack.layout.root_cert
    svc = issue_service_identity(live_stack.layout.root, "backend", None, datetime.now(UTC))
    backend = Peer("backend", ca, svc.cert, svc.key, live_stack.mqtt_port).start()
    wait(backend.connected, "service connect")
    backend.client.subscribe("devices/+/telemetry", qos=1)
    time.sleep(0.3)

    devices = {}
    for name in ("dev-a", "dev-b"):
        cert, key = enrolled_device(live_stack, tmp_path, name)
        devices[name] = Peer(name, ca, cert, key, live_stack.mqtt_port).start()
        wait(devices[name].connected, f"{name} connect")

    devices["dev-a"].client.publish("devices/dev-a/telemetry", b'{"uptime": 1}', qos=1)
    wait(backend.got_message, "telemetry at the service")
    assert backend.messages[0] == ("devices/dev-a/telemetry", b'{"uptime": 1}')

    # Revoke through the admin API: the live session must drop within a second.
    t0 = time.monotonic()
    assert (
        admin(
            live_stack, "POST", "/admin/devices/dev-a/revoke", {"reason": "key-compromise"}
        ).status
        == 200
    )
    wait(devices["dev-a"].disconnected, "dev-a dropped", timeout=5)
    assert devices["dev-a"].disconnected_at - t0 < 1.0
    devices["dev-a"].client.loop_stop()
    # dev-b is undisturbed and still delivers.
    assert not devices["dev-b"].disconnected.is_set()
    backend.got_message.clear()
    devices["dev-b"].client.publish("devices/dev-b/telemetry", b"{}", qos=1)
    wait(backend.got_message, "dev-b telemetry after the revocation")

    # The revoked device is refused at reconnect.
    cert, key = tmp_path / "dev-a/cert.pem", tmp_path / "dev-a/key.pem"
    again = Peer("dev-a", ca, cert, key, live_stack.mqtt_port)
    try:
        again.start()
        deadline = time.monotonic() + 5
        while (
            again.refused is None
            and not again.disconnected.is_set()
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert not again.connected.is_set()
    except (OSError, ConnectionError):
        pass  # refused at the TLS or socket level is also a refusal
    finally:
        again.client.loop_stop()
    devices["dev-b"].stop()
    backend.stop()


def test_cli_revoke_from_another_process_drops_session(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    cert, key = enrolled_device(live_stack, tmp_path, "dev-x")
    peer = Peer("dev-x", live_stack.layout.root_cert, cert, key, live_stack.mqtt_port).start()
    wait(peer.connected, "dev-x connect")
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "enroll_server.cli",
            "device",
            "revoke",
            "dev-x",
            "--home",
            str(live_stack.layout.root),
            "--reason",
            "key-compromise",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    done = time.monotonic()
    assert r.returncode == 0, r.stderr
    wait(peer.disconnected, "dev-x dropped after CLI revoke", timeout=5)
    # Measured from the moment the revoking process finished (its commit is visible).
    assert peer.disconnected_at - done < 1.0, (peer.disconnected_at - done, done - t0)
    peer.client.loop_stop()
