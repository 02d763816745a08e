"""A real mosquitto 2.0 started from `mosquitto-config`: CRL refusal and live session drop."""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from typer.testing import CliRunner

from enroll_server.broker.issuer_crls import IssuerCrls
from enroll_server.broker.mosquitto_cli import app as mosquitto_app
from enroll_server.broker.mosquitto_config import (
    SYNC_USERNAME,
    MosquittoFiles,
    dynsec_password_hash,
)
from enroll_server.broker.mosquitto_dynsec import open_control
from enroll_server.broker.mosquitto_sync import MosquittoSync, read_cursor, read_pid
from enroll_server.cli.app import app as fleetpki_app
from enroll_server.home.layout import LoadedHome, load_home, renew_server_certificate
from enroll_server.pki.ca import Issuer
from enroll_server.pki.keys import load_private_key_pem
from enroll_server.registry import Registry
from enroll_server.revocation.publisher import CrlPublisher
from fleetpki.identity import DeviceId
from tests.integration.revocation_support import Fleet, free_port
from tests.live_server import make_home
from tests.pki_helpers import MemoryCa


@pytest.fixture(autouse=True)
def _mosquitto_installed() -> None:
    # .ci/run installs mosquitto; its absence must fail the run, not skip the relying party.
    assert shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists(), (
        "mosquitto is required (apt-get install mosquitto mosquitto-clients)"
    )


runner = CliRunner()


def _ca_of(loaded: LoadedHome) -> MemoryCa:
    layout = loaded.layout
    phrase = layout.passphrase_file.read_bytes().strip()
    root_key = load_private_key_pem(layout.root_key.read_bytes(), phrase)
    server_key = load_private_key_pem(layout.server_key.read_bytes(), None)
    server_cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    return MemoryCa(Issuer(loaded.root_cert, root_key), loaded.issuer, server_cert, server_key)


@dataclass
class Broker:
    fleet: Fleet
    loaded: LoadedHome
    files: MosquittoFiles
    port: int
    proc: subprocess.Popen[bytes]
    home: Path

    def sync(self, registry: Registry | None = None) -> MosquittoSync:
        publisher = CrlPublisher(
            registry or self.fleet.registry, self.loaded.issuer, since_seq=read_cursor(self.files)
        )
        layout = self.loaded.layout
        return MosquittoSync(
            publisher,
            self.files,
            lambda: read_pid(self.files.pidfile),
            open_control(self.files),
            lambda: datetime.now(UTC),
            server_pair=(layout.server_cert, layout.server_key),
        )

    def log(self) -> str:
        return (self.home / "mosquitto.log").read_text(errors="replace")

    def wait_reloads(self, count: int) -> None:
        """Until mosquitto has logged `count` config reloads (SIGHUP is handled async)."""
        deadline = time.monotonic() + 5
        while self.log().count("Reloading config.") < count:
            assert time.monotonic() < deadline, "mosquitto never reloaded its config"
            time.sleep(0.02)


def _config(home: Path, out: Path, port: int, *extra: str, user: str = "root") -> None:
    result = runner.invoke(
        mosquitto_app,
        [
            "mosquitto-config",
            "--home",
            str(home),
            "--out",
            str(out),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--admin-port",
            str(free_port()),
            # Tests run as root in a 0700 tmp folder the 'mosquitto' user cannot enter.
            "--user",
            user,
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {log.read_text(errors='replace')}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("mosquitto did not start listening within 10 s")


def _start(
    tmp_path: Path, *config_extra: str, out: Path | None = None, user: str = "root"
) -> Iterator[Broker]:
    home = tmp_path / "home"
    make_home(home)
    loaded = load_home(home)
    registry = Registry.open(loaded.layout.registry)
    fleet = Fleet(_ca_of(loaded), registry, tmp_path)
    out = out or tmp_path / "mosquitto"
    port = free_port()
    _config(home, out, port, *config_extra, user=user)
    files = MosquittoFiles(out)
    log = home / "mosquitto.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(["mosquitto", "-c", str(files.conf)], stdout=sink, stderr=sink)
    try:
        _wait_listening(port, proc, log)
        yield Broker(fleet, loaded, files, port, proc, home)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        registry.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    yield from _start(tmp_path)


@pytest.fixture
def dropped_privileges_broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto started by root and dropping to the 'mosquitto' account, as packaged."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start mosquitto the way its package does")
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no 'mosquitto' account")
    # Outside tmp_path: pytest's folders are 0700 and the broker's account must get in.
    out = Path(tempfile.mkdtemp(prefix="fleetpki-mosquitto-", dir="/tmp"))
    try:
        yield from _start(tmp_path, out=out, user="mosquitto")
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def crl_only_broker(tmp_path: Path) -> Iterator[Broker]:
    yield from _start(tmp_path, "--no-live-drop")


class Device:
    """A real paho client with the device's certificate; records its disconnects."""

    def __init__(
        self, broker: Broker, device_id: str, files: tuple[Path, Path] | None = None
    ) -> None:
        self.device_id = device_id
        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.settled = threading.Event()  # CONNACK or the connection closed, whichever first
        self.refused: str | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: list[list[int]] = []
        self._got = threading.Condition()
        ctx = ssl.create_default_context(cafile=str(broker.fleet.chain_file()))
        cert, key = files or (broker.fleet.cert_file(device_id), broker.fleet.key_file(device_id))
        ctx.load_cert_chain(cert, key)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311
        )
        self.client.tls_set_context(ctx)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.port = broker.port

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
        else:
            self.connected.set()
        self.settled.set()

    def _on_disconnect(self, *_a: Any) -> None:
        if self.connected.is_set():
            self.dropped.set()
        self.settled.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._got:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._got.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        with self._got:
            self.subacks.append([int(getattr(c, "value", c)) for c in codes])
            self._got.notify_all()

    def start(self) -> Device:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(5), f"{self.device_id} did not connect: {self.refused}"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> list[int]:
        with self._got:
            before = len(self.subacks)
            self.client.subscribe(topic, qos=1)
            assert self._got.wait_for(lambda: len(self.subacks) > before, 5)
            return self.subacks[-1]

    def wait_message(self, topic: str, timeout: float = 5) -> bytes | None:
        with self._got:
            self._got.wait_for(lambda: any(t == topic for t, _ in self.messages), timeout)
            return next((p for t, p in self.messages if t == topic), None)


def _can_connect(broker: Broker, device_id: str) -> bool:
    """A fresh connection of `device_id`: True if mosquitto accepts it (CONNACK 0) and keeps it
    for a moment. Driven by hand (no paho thread, so no reconnect back-off to wait out)."""
    dev = Device(broker, device_id)
    try:
        dev.client.connect("127.0.0.1", broker.port, keepalive=30)
    except (ssl.SSLError, OSError):
        return False
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline and not dev.settled.is_set():
            if dev.client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                return False
        if not dev.connected.is_set():
            return False
        until = time.monotonic() + 0.3
        while time.monotonic() < until:
            if dev.client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                return False
        return not dev.dropped.is_set()
    finally:
        dev.client.disconnect()


def _pub(broker: Broker, device_id: str, topic: str) -> int:
    """mosquitto_pub (a real client) with the device's certificate; its exit code."""
    return subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "--cafile",
            str(broker.fleet.chain_file()),
            "--cert",
            str(broker.fleet.cert_file(device_id)),
            "--key",
            str(broker.fleet.key_file(device_id)),
            "--insecure",  # the server certificate names localhost; we dial 127.0.0.1 by IP
            "-t",
            topic,
            "-m",
            "x",
        ],
        capture_output=True,
        timeout=10,
    ).returncode


# ------------------------------------------------------------------------- configuration


def test_generated_configuration(broker: Broker) -> None:
    files = broker.files
    conf = files.conf.read_text()
    for line in (
        f"listener {broker.port} 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        f"cafile {files.cafile}",
        f"certfile {files.certfile}",
        f"keyfile {files.keyfile}",
        f"crlfile {files.crlfile}",
        "set_tcp_nodelay true",
        "allow_anonymous false",
        f"acl_file {files.acl}",
        f"plugin_opt_config_file {files.dynsec}",
        "user root",
    ):
        assert line in conf.splitlines(), line
    assert "pattern readwrite devices/%u/#" in files.acl.read_text().splitlines()
    assert files.keyfile.stat().st_mode & 0o777 == 0o600
    assert files.sync_secret.stat().st_mode & 0o777 == 0o600
    assert files.crlfile.stat().st_mode & 0o777 == 0o644
    # The dynsec admin is the syncer alone, and its password hash is the one mosquitto checks.
    doc = json.loads(files.dynsec.read_text())
    (admin,) = doc["clients"]
    assert admin["username"] == SYNC_USERNAME
    password = files.sync_secret.read_text().strip()
    salt = base64.b64decode(admin["salt"])
    assert admin["password"] == dynsec_password_hash(password, salt, admin["iterations"])
    assert read_pid(files.pidfile) == broker.proc.pid
    # Only the two listeners we asked for (a misplaced listener option would add 1883).
    opened = [line for line in broker.log().splitlines() if "listen socket" in line]
    assert len(opened) == 2, opened
    assert not any("1883" in line for line in opened)


def test_rerunning_config_keeps_the_sync_password(broker: Broker, tmp_path: Path) -> None:
    before = broker.files.sync_secret.read_text()
    _config(broker.home, broker.files.folder, broker.port, "--force")
    assert broker.files.sync_secret.read_text() == before


def _presented_serial(broker: Broker) -> int:
    """The serial of mosquitto's server certificate, read in a TLS 1.3 handshake (the server's
    Certificate precedes the client's, so none is needed to see it)."""
    ctx = ssl.create_default_context(cafile=str(broker.loaded.layout.root_cert))
    ctx.check_hostname = False  # dialled by IP; the chain is still verified
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sync_hands_a_renewed_server_certificate_to_mosquitto(broker: Broker) -> None:
    sync = broker.sync()
    assert sync.step().server_serial is None  # the copy mosquitto-config made is current
    old = _presented_serial(broker)
    reloads = broker.log().count("Reloading config.")
    # A pair caught mid-renewal (new key, old certificate) is not handed over.
    layout = broker.loaded.layout
    old_cert = layout.server_cert.read_bytes()
    new = renew_server_certificate(
        layout, broker.loaded.issuer, broker.loaded.config, datetime.now(UTC)
    )
    new_cert = layout.server_cert.read_bytes()
    layout.server_cert.write_bytes(old_cert)
    assert sync.step().server_serial is None
    assert broker.files.certfile.read_bytes() == old_cert
    layout.server_cert.write_bytes(new_cert)
    assert sync.step().server_serial == new.serial_number
    broker.wait_reloads(reloads + 1)
    deadline = time.monotonic() + 5
    while _presented_serial(broker) == old and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _presented_serial(broker) == new.serial_number
    assert sync.step().server_serial is None  # handed over once


# ------------------------------------------------------------------------- revocation


def test_revoked_device_is_dropped_live_and_refused_at_reconnect(broker: Broker) -> None:
    fleet = broker.fleet
    fleet.enroll("mq-victim-1")
    fleet.enroll("mq-bystander-1")
    fleet.enroll("mq-control-1")  # for one-shot clients: client id = CN, one session each
    sync = broker.sync()
    sync.step()  # start state: CRL without either
    victim = Device(broker, "mq-victim-1").start()
    bystander = Device(broker, "mq-bystander-1").start()
    try:
        assert victim.subscribe("devices/mq-victim-1/commands") == [1]
        assert _pub(broker, "mq-control-1", "devices/mq-control-1/telemetry") == 0

        fleet.registry.revoke_device(
            DeviceId("mq-victim-1"), reason="keyCompromise", now=datetime.now(UTC), actor="t"
        )
        done = sync.step()
        assert done.crl_number is not None
        assert done.dropped == ("mq-victim-1",)

        assert victim.dropped.wait(5), "the live session of the revoked device was not dropped"
        assert "disconnected by administrative action" in broker.log()
        assert not bystander.dropped.is_set()
        assert bystander.client.is_connected()
        # The victim's reconnects are refused at the TLS handshake (CRL reloaded first).
        for _ in range(3):
            assert not _can_connect(broker, "mq-victim-1")
        assert _pub(broker, "mq-victim-1", "devices/mq-victim-1/telemetry") != 0
        assert _pub(broker, "mq-control-1", "devices/mq-control-1/telemetry") == 0
        assert "certificate verify failed" in broker.log()
    finally:
        victim.stop()
        bystander.stop()


def test_suspend_drops_and_resume_readmits(broker: Broker) -> None:
    fleet = broker.fleet
    fleet.enroll("mq-hold-1")
    did = DeviceId("mq-hold-1")
    sync = broker.sync()
    sync.step()
    dev = Device(broker, "mq-hold-1").start()
    try:
        fleet.registry.suspend_device(did, now=datetime.now(UTC), actor="t")
        assert sync.step().dropped == ("mq-hold-1",)
        assert dev.dropped.wait(5)
        assert not _can_connect(broker, "mq-hold-1")
        # paho would keep reconnecting in the background, and with client id = CN its session
        # and the probe below would take each other over: stop it first.
        dev.stop()
        fleet.registry.resume_device(did, now=datetime.now(UTC), actor="t")
        done = sync.step()
        assert done.crl_number is not None and done.dropped == ()
        assert _can_connect(broker, "mq-hold-1")
    finally:
        dev.stop()


def test_acl_confines_devices_and_keeps_them_off_the_control_topic(broker: Broker) -> None:
    # mosquitto grants every SUBSCRIBE and applies acl_file when delivering, so "denied"
    # shows as messages that never arrive; a's own traffic proves delivery itself works.
    fleet = broker.fleet
    fleet.enroll("mq-acl-a")
    fleet.enroll("mq-acl-b")
    a = Device(broker, "mq-acl-a").start()
    b = Device(broker, "mq-acl-b").start()
    try:
        a.subscribe("devices/mq-acl-a/#")
        a.subscribe("devices/mq-acl-b/#")
        b.subscribe("$CONTROL/dynamic-security/#")
        # A device trying to administer dynsec (delete the syncer's account) is denied...
        b.client.publish(
            "$CONTROL/dynamic-security/v1",
            json.dumps({"commands": [{"command": "deleteClient", "username": SYNC_USERNAME}]}),
            qos=1,
        ).wait_for_publish(5)
        b.client.publish("devices/mq-acl-b/telemetry", b"own", qos=1).wait_for_publish(5)
        b.client.publish("devices/mq-acl-a/commands", b"forged", qos=1).wait_for_publish(5)
        a.client.publish("devices/mq-acl-a/telemetry", b"mine", qos=1).wait_for_publish(5)
        assert a.wait_message("devices/mq-acl-a/telemetry") == b"mine"
        assert a.wait_message("devices/mq-acl-b/telemetry", timeout=0.5) is None
        assert a.wait_message("devices/mq-acl-a/commands", timeout=0.5) is None
        # ...so the syncer can still drop sessions, and b never sees its control traffic.
        fleet.registry.revoke_device(
            DeviceId("mq-acl-a"), reason="superseded", now=datetime.now(UTC), actor="t"
        )
        assert broker.sync().step().dropped == ("mq-acl-a",)
        assert a.dropped.wait(5)
        assert b.wait_message("$CONTROL/dynamic-security/v1/response", timeout=0.5) is None
        assert not any(t.startswith("$CONTROL") for t, _ in b.messages)
    finally:
        a.stop()
        b.stop()


def test_a_device_cannot_take_over_another_devices_client_id(broker: Broker) -> None:
    broker.fleet.enroll("mq-id-a")
    broker.fleet.enroll("mq-id-b")
    a = Device(broker, "mq-id-a").start()
    intruder = Device(broker, "mq-id-b")
    intruder.client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="mq-id-a", protocol=mqtt.MQTTv311
    )
    ctx = ssl.create_default_context(cafile=str(broker.fleet.chain_file()))
    ctx.load_cert_chain(broker.fleet.cert_file("mq-id-b"), broker.fleet.key_file("mq-id-b"))
    intruder.client.tls_set_context(ctx)
    intruder.client.on_connect = intruder._on_connect
    intruder.client.on_disconnect = intruder._on_disconnect
    intruder.start()
    try:
        # use_username_as_clientid on the device listener: the id is the CN, not what was sent.
        assert not a.dropped.wait(1.0)
        assert a.client.is_connected()
        assert "as mq-id-b (" in broker.log()
    finally:
        a.stop()
        intruder.stop()


def test_sync_once_cli_drops_sessions_revoked_while_it_was_not_running(broker: Broker) -> None:
    fleet = broker.fleet
    fleet.enroll("mq-once-1")
    dev = Device(broker, "mq-once-1").start()
    try:
        cursor = read_cursor(broker.files)
        fleet.registry.revoke_device(
            DeviceId("mq-once-1"), reason="cessationOfOperation", now=datetime.now(UTC), actor="t"
        )
        result = runner.invoke(
            mosquitto_app,
            [
                "mosquitto-sync",
                "--home",
                str(broker.home),
                "--conf-dir",
                str(broker.files.folder),
                "--pidfile",
                str(broker.files.pidfile),
                "--once",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "mq-once-1" in result.output
        assert dev.dropped.wait(5)
        assert not _can_connect(broker, "mq-once-1")
        new_cursor = read_cursor(broker.files)
        assert cursor is not None and new_cursor is not None and new_cursor > cursor
    finally:
        dev.stop()


def test_sync_cli_refuses_pid_and_pidfile_together(broker: Broker) -> None:
    result = runner.invoke(
        mosquitto_app,
        [
            "mosquitto-sync",
            "--home",
            str(broker.home),
            "--conf-dir",
            str(broker.files.folder),
            "--pid",
            str(os.getpid()),
            "--pidfile",
            str(broker.files.pidfile),
            "--once",
        ],
    )
    assert result.exit_code == 2


def test_without_live_drop_the_crl_refuses_new_connections_only(crl_only_broker: Broker) -> None:
    # The 2.0.11 baseline the issue measured: SIGHUP + crlfile stops new connections, but a
    # session that is already up survives - which is why live drop exists.
    broker = crl_only_broker
    assert "plugin" not in broker.files.conf.read_text()
    broker.fleet.enroll("mq-crl-only-1")
    sync = broker.sync()
    sync.step()
    dev = Device(broker, "mq-crl-only-1").start()
    try:
        broker.fleet.registry.revoke_device(
            DeviceId("mq-crl-only-1"), reason="keyCompromise", now=datetime.now(UTC), actor="t"
        )
        done = sync.step()
        assert done.crl_number is not None and done.dropped == ()
        broker.wait_reloads(2)  # the first sync round reloaded once already
        assert not _can_connect(broker, "mq-crl-only-1")
        assert not dev.dropped.wait(1.5)
        assert dev.client.is_connected()
    finally:
        dev.stop()


def test_sync_daemon_drops_a_revoked_session_and_stops_on_sigterm(broker: Broker) -> None:
    fleet = broker.fleet
    fleet.enroll("mq-daemon-1")
    dev = Device(broker, "mq-daemon-1").start()
    argv = [
        sys.executable,
        "-c",
        "from enroll_server.broker.mosquitto_cli import app; app()",
        "mosquitto-sync",
        "--home",
        str(broker.home),
        "--conf-dir",
        str(broker.files.folder),
        "--interval",
        "0.1",
    ]
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while broker.log().count("Reloading config.") < 1:  # its first round reloads the CRL
            assert daemon.poll() is None, daemon.stdout.read() if daemon.stdout else ""
            assert time.monotonic() - started < 15, "mosquitto-sync never ran a round"
            time.sleep(0.05)
        fleet.registry.revoke_device(
            DeviceId("mq-daemon-1"), reason="keyCompromise", now=datetime.now(UTC), actor="t"
        )
        assert dev.dropped.wait(5), "the daemon did not drop the revoked session"
        dev.stop()
        assert not _can_connect(broker, "mq-daemon-1")
    finally:
        dev.stop()
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(5)
            raise
    assert code == 0


def test_broker_dropping_to_its_own_account_still_reloads_and_kicks(
    dropped_privileges_broker: Broker,
) -> None:
    broker = dropped_privileges_broker
    assert "user mosquitto" in broker.files.conf.read_text().splitlines()
    assert read_pid(broker.files.pidfile) == broker.proc.pid  # written after the drop
    owner = pwd.getpwuid(broker.files.keyfile.stat().st_uid).pw_name
    assert owner == "mosquitto"
    broker.fleet.enroll("mq-priv-1")
    sync = broker.sync()
    sync.step()
    dev = Device(broker, "mq-priv-1").start()
    try:
        broker.fleet.registry.revoke_device(
            DeviceId("mq-priv-1"), reason="keyCompromise", now=datetime.now(UTC), actor="t"
        )
        assert sync.step().dropped == ("mq-priv-1",)
        assert dev.dropped.wait(5)
        dev.stop()
        assert not _can_connect(broker, "mq-priv-1")
        # mosquitto (as its own user) could save the dynsec file it rewrites on changes.
        assert "Error saving Dynamic security plugin config" not in broker.log()
        # A renewed server key handed over stays readable by mosquitto's account.
        layout = broker.loaded.layout
        new = renew_server_certificate(
            layout, broker.loaded.issuer, broker.loaded.config, datetime.now(UTC)
        )
        assert sync.step().server_serial == new.serial_number
        assert pwd.getpwuid(broker.files.keyfile.stat().st_uid).pw_name == "mosquitto"
        deadline = time.monotonic() + 5
        while _presented_serial(broker) != new.serial_number and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _presented_serial(broker) == new.serial_number
    finally:
        dev.stop()


# ------------------------------------------------------------------------- issuing CA rollover


def test_sync_follows_an_issuing_ca_rollover(broker: Broker, tmp_path: Path) -> None:
    """After `fleetpki ca rollover`, mosquitto-sync hands mosquitto the new chain and one CRL
    per live issuer: old and new certificates (presented alone) connect, and a revoked one of
    the new issuer is refused."""
    fleet, files = broker.fleet, broker.files
    fleet.enroll("mq-old-1")
    fleet.enroll("mq-old-2")
    crls = IssuerCrls(
        fleet.registry, broker.loaded, next_update=timedelta(hours=1), since_seq=read_cursor(files)
    )
    sync = MosquittoSync(
        crls,
        files,
        lambda: read_pid(files.pidfile),
        open_control(files),
        lambda: datetime.now(UTC),
        ca_chain=broker.loaded.layout.chain,
    )
    sync.step()
    assert _can_connect(broker, "mq-old-1")
    rolled = runner.invoke(fleetpki_app, ["ca", "rollover", "--home", str(broker.home)])
    assert rolled.exit_code == 0, rolled.output
    reloads = broker.log().count("Reloading config.")
    assert sync.step().crl_number is not None
    broker.wait_reloads(reloads + 1)
    assert files.cafile.read_bytes() == broker.loaded.layout.chain.read_bytes()
    assert files.crlfile.read_bytes().count(b"-----BEGIN X509 CRL-----") == 2
    new_issuer = load_home(broker.home).issuer
    fleet.ca = replace(fleet.ca, issuing=new_issuer)
    fleet.enroll("mq-new-1")
    fleet.enroll("mq-new-2")
    assert _can_connect(broker, "mq-old-1")
    assert _can_connect(broker, "mq-new-1")
    # A revocation of each issuer's certificate reaches mosquitto through that issuer's CRL.
    for name in ("mq-old-2", "mq-new-2"):
        fleet.registry.revoke_device(
            DeviceId(name), reason="keyCompromise", now=datetime.now(UTC), actor="t"
        )
    assert sync.step().crl_number is not None
    assert not _can_connect(broker, "mq-new-2")
    assert not _can_connect(broker, "mq-old-2")
    assert _can_connect(broker, "mq-new-1") and _can_connect(broker, "mq-old-1")
