"""A real RabbitMQ 3.10 node started from `rabbitmq-config`, its authorisation answered by a
real `fleetpki serve` (HTTP auth backend), kept current by rabbitmq-sync.

One node for the whole module: RabbitMQ takes seconds to boot. Each test uses its own device
ids, so what one test revokes does not disturb another.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from device_agent.backoff import Backoff
from device_agent.mqtt_link import MqttLink
from enroll_server.broker.issuer_crls import IssuerCrls
from enroll_server.broker.rabbitmq_auth_routes import SYNC_SECRET_FILE, read_secret
from enroll_server.broker.rabbitmq_cli import app as rabbitmq_app
from enroll_server.broker.rabbitmq_config import RabbitFiles, crl_hash
from enroll_server.broker.rabbitmq_sync import (
    Management,
    ManagementUnavailable,
    PemCacheClear,
    RabbitSync,
    read_cursor,
)
from enroll_server.cli.app import app as fleetpki_app
from enroll_server.home.layout import load_home, renew_server_certificate
from enroll_server.pki.keys import private_key_pem
from enroll_server.revocation.publisher import CrlPublisher
from fleetpki.identity import DeviceId
from tests.integration.revocation_support import Fleet
from tests.integration.test_revocation_mosquitto import _ca_of
from tests.live_server import LiveServer, start_live_server
from tests.pki_helpers import MemoryCa
from tests.rabbitmq_node import CTL, SERVER, RabbitNode, configure, free_port, stop_epmd

runner = CliRunner()
FAST = Backoff(base=0.2, factor=2.0, cap=1.0)


@dataclass
class Tier:
    server: LiveServer
    fleet: Fleet
    files: RabbitFiles
    node: RabbitNode
    folder: Path

    @property
    def port(self) -> int:
        return self.node.mqtt_port

    @property
    def home(self) -> Path:
        return self.server.layout.root

    def management(self) -> Management:
        password = read_secret(self.home, SYNC_SECRET_FILE)
        assert password is not None
        return Management((self.node.management_port,), password)

    def sync(
        self,
        reload_certificates: Callable[[], None] | None = None,
        management: Management | None = None,
    ) -> RabbitSync:
        loaded = load_home(self.home)
        publisher = CrlPublisher(
            self.fleet.registry, loaded.issuer, since_seq=read_cursor(self.files)
        )
        return RabbitSync(
            publisher,
            self.files,
            management or self.management(),
            lambda: datetime.now(UTC),
            server_pair=(loaded.layout.server_cert, loaded.layout.server_key),
            reload_certificates=reload_certificates,
        )


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    # .ci/run installs rabbitmq-server; its absence must fail the run, not skip it.
    assert SERVER.exists(), "rabbitmq-server is required (apt-get install rabbitmq-server)"
    assert shutil.which("mosquitto_pub"), "mosquitto-clients are required"
    folder = tmp_path_factory.mktemp("rabbitmq")
    server = start_live_server(folder / "home")
    epmd = free_port()
    node: RabbitNode | None = None
    try:
        fleet = Fleet(_ca_of(load_home(server.layout.root)), server.registry, folder)
        conf = folder / "conf"
        mqtt_port, management_port = free_port(), free_port()
        configure(server.layout.root, conf, mqtt_port, management_port, server.handle.admin_port)
        node = RabbitNode(folder, conf, "fpk1", mqtt_port, management_port, epmd)
        node.start()
        yield Tier(server, fleet, RabbitFiles(conf), node, folder)
    finally:
        if node is not None:
            node.stop(kill=True)  # a throwaway node: no graceful shutdown to wait for
        stop_epmd(epmd)
        server.stop()


# ------------------------------------------------------------------------------- clients


@dataclass
class Attempt:
    """What one CONNECT got: accepted (CONNACK 0), refused (CONNACK code), or closed first."""

    connack: int | None  # None: no CONNACK (TLS refused, or the connection closed)
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.connack == 0


def _ctx(fleet: Fleet, files: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(fleet.chain_file()))
    ctx.check_hostname = False  # the server certificate names localhost; we dial 127.0.0.1
    if files is not None:
        ctx.load_cert_chain(*files)
    return ctx


class Client:
    """A paho client driven by hand (no background thread: no reconnects behind our back)."""

    def __init__(
        self,
        tier: Tier,
        client_id: str,
        files: tuple[Path, Path] | None,
        *,
        password: tuple[str, str] | None = None,
        protocol: Any = mqtt.MQTTv311,
    ) -> None:
        self.tier = tier
        self.connack: int | None = None
        self.closed = False
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: list[list[int]] = []
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self.c.tls_set_context(_ctx(tier.fleet, files))
        if password is not None:
            self.c.username_pw_set(*password)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *_a: setattr(self, "closed", True)
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.c.on_subscribe = lambda _c, _u, _m, codes, _p: self.subacks.append(
            [int(getattr(x, "value", x)) for x in codes]
        )

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = int(getattr(reason, "value", reason))

    def pump(self, seconds: float, until: Any = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.closed:
            if self.c.loop(0.02) != mqtt.MQTT_ERR_SUCCESS:
                self.closed = True
                return
            if until is not None and until():
                return

    def connect(self, timeout: float = 5) -> Attempt:
        try:
            self.c.connect("127.0.0.1", self.tier.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            return Attempt(None, str(exc))
        self.pump(timeout, lambda: self.connack is not None)
        return Attempt(self.connack if not (self.closed and self.connack is None) else None)

    def subscribe(self, topic: str) -> None:
        self.c.subscribe(topic, qos=0)

    def publish(self, topic: str, payload: bytes = b"x") -> None:
        self.c.publish(topic, payload, qos=0)

    def close(self) -> None:
        self.c.disconnect()


def device(tier: Tier, device_id: str) -> tuple[Path, Path]:
    tier.fleet.enroll(device_id)
    return tier.fleet.cert_file(device_id), tier.fleet.key_file(device_id)


def connected(tier: Tier, device_id: str, files: tuple[Path, Path] | None = None) -> Client:
    files = files or (tier.fleet.cert_file(device_id), tier.fleet.key_file(device_id))
    client = Client(tier, device_id, files)
    assert client.connect().accepted, f"{device_id} was refused"
    return client


def mosquitto_pub(tier: Tier, device_id: str, topic: str, *extra: str) -> int:
    return subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(tier.port),
            "--cafile",
            str(tier.fleet.chain_file()),
            "--cert",
            str(tier.fleet.cert_file(device_id)),
            "--key",
            str(tier.fleet.key_file(device_id)),
            "--insecure",
            "-i",
            device_id,
            "-t",
            topic,
            "-m",
            "hello",
            "-q",
            "1",
            *extra,
        ],
        capture_output=True,
        timeout=15,
    ).returncode


# --------------------------------------------------------------------------------- tests


def test_generated_configuration(tier: Tier) -> None:
    files = tier.files
    conf = files.conf.read_text().splitlines()
    for line in (
        f"mqtt.listeners.ssl.default = 127.0.0.1:{tier.port}",
        "listeners.tcp = none",
        "mqtt.listeners.tcp = none",
        "mqtt.ssl_cert_login = true",
        "ssl_cert_login_from = common_name",
        "mqtt.allow_anonymous = false",
        "auth_backends.1 = cache",
        "auth_cache.cached_backend = http",
        "management.tcp.ip = 127.0.0.1",
    ):
        assert line in conf, line
    advanced = files.advanced.read_text()
    for term in (
        "{verify, verify_peer}",
        "{fail_if_no_peer_cert, true}",
        "{crl_check, peer}",
        "{hibernate_after, 5000}",
    ):
        assert term in advanced, term
    for private in (files.keyfile, files.conf, files.advanced):
        assert private.stat().st_mode & 0o777 == 0o600, private
    crls = list(files.crl_dir.iterdir())
    assert [p.name for p in crls] == [f"{crl_hash(crls[0].read_bytes())}.r0"]
    assert files.plugins.read_text() == (
        "[rabbitmq_mqtt,rabbitmq_auth_backend_http,rabbitmq_auth_backend_cache,"
        "rabbitmq_management].\n"
    )


def service(tier: Tier, name: str) -> Client:
    """A backend identity (role service in the registry) reading every device's telemetry."""
    if tier.fleet.registry.get_device(DeviceId(name)) is None:
        tier.fleet.registry.add_device(
            DeviceId(name), role="service", now=datetime.now(UTC), actor="t"
        )
    client = connected(tier, name, device(tier, name))
    client.subscribe("devices/+/telemetry")
    client.pump(2, lambda: bool(client.subacks))
    assert client.subacks == [[0]]
    return client


def test_devices_publish_on_their_own_topic_mosquitto_clients_and_our_agent(tier: Tier) -> None:
    device(tier, "ok-1")
    device(tier, "ok-2")
    watcher = service(tier, "svc-1")
    assert mosquitto_pub(tier, "ok-1", "devices/ok-1/telemetry") == 0
    watcher.pump(5, lambda: bool(watcher.messages))
    assert watcher.messages == [("devices/ok-1/telemetry", b"hello")]

    # our agent's MQTT link, unchanged: it connects as itself and its telemetry arrives
    cert, key = tier.fleet.cert_file("ok-2"), tier.fleet.key_file("ok-2")

    async def run_link() -> int:
        link = MqttLink(
            DeviceId("ok-2"),
            "localhost",
            tier.port,
            tier.fleet.chain_file(),
            lambda: (cert, key),
            backoff=FAST,
            timeout=3.0,
        )
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                await link.connected.wait()
            link.enqueue(b'{"n": 1}')
            async with asyncio.timeout(10):
                while link.published < 1:
                    await asyncio.sleep(0.02)
            return link.published
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(run_link()) == 1
    watcher.pump(5, lambda: len(watcher.messages) > 1)
    assert watcher.messages[1] == ("devices/ok-2/telemetry", b'{"n": 1}')
    watcher.close()


def test_refused_no_certificate(tier: Tier) -> None:
    assert Client(tier, "nocert", None).connect().connack is None


def test_refused_certificate_of_another_ca(tier: Tier, ca: MemoryCa) -> None:
    cert, key = ca.device_cert("stranger", now=datetime.now(UTC))
    c, k = tier.folder / "stranger.pem", tier.folder / "stranger.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(private_key_pem(key, None))
    assert Client(tier, "stranger", (c, k)).connect().connack is None


def test_refused_certificate_with_a_password(tier: Tier) -> None:
    """A username/password would otherwise win over the certificate (RabbitMQ 3.10)."""
    files = device(tier, "pw-1")
    for creds in (("guest", "guest"), ("pw-1", "anything")):
        got = Client(tier, "pw-1", files, password=creds).connect()
        assert not got.accepted, creds


def test_refused_mqtt5(tier: Tier) -> None:
    files = device(tier, "v5-1")
    got = Client(tier, "v5-1", files, protocol=mqtt.MQTTv5).connect()
    assert not got.accepted


def test_refused_spoofed_client_id_and_the_victim_is_not_kicked(tier: Tier) -> None:
    device(tier, "victim")
    attacker = device(tier, "attacker")
    victim = connected(tier, "victim")
    got = Client(tier, "victim", attacker).connect()
    assert got.connack == 135, got  # CONNACK 5 "not authorized", as paho's reason code
    victim.pump(1.0)
    assert not victim.closed, "the victim's session was taken over"
    victim.close()


def test_made_useless_other_devices_topic_and_wildcards(tier: Tier) -> None:
    device(tier, "top-1")
    device(tier, "top-2")
    target = connected(tier, "top-2")
    target.subscribe("devices/top-2/#")
    target.pump(0.5, lambda: target.subacks)
    # publishing into another device's topic: not delivered, and the publisher is cut off
    assert mosquitto_pub(tier, "top-1", "devices/top-2/commands") != 0
    target.pump(1.0)
    assert target.messages == []
    target.close()
    # subscribing to another device's topics, to '#' or to every device: connection closed
    for topic in ("devices/top-2/#", "#", "devices/+/telemetry"):
        snoop = connected(tier, "top-1")
        snoop.subscribe(topic)
        snoop.pump(3, lambda s=snoop: bool(s.subacks))  # type: ignore[misc]
        assert snoop.closed or snoop.subacks == [[128]], topic


def test_revoke_drops_the_live_session_within_1s_and_reconnect_is_refused(tier: Tier) -> None:
    device(tier, "rev-1")
    device(tier, "sus-1")
    sync = tier.sync()
    stop = threading.Event()
    loop = threading.Thread(target=sync.run, args=(0.05, stop), daemon=True)
    loop.start()
    try:
        for name, act in (
            ("rev-1", tier.fleet.registry.revoke_device),
            ("sus-1", tier.fleet.registry.suspend_device),
        ):
            live = connected(tier, name)
            started = time.monotonic()
            if name == "rev-1":
                act(DeviceId(name), reason="keyCompromise", now=datetime.now(UTC), actor="t")
            else:
                act(DeviceId(name), now=datetime.now(UTC), actor="t")
            live.pump(3)
            took = time.monotonic() - started
            assert live.closed and took < 1.0, (name, took)
            assert not Client(tier, name, live_files(tier, name)).connect().accepted, name
    finally:
        stop.set()
        loop.join(5)


def live_files(tier: Tier, name: str) -> tuple[Path, Path]:
    return tier.fleet.cert_file(name), tier.fleet.key_file(name)


def test_sync_killed_and_restarted_catches_up(tier: Tier) -> None:
    device(tier, "late-1")
    # one round now: the cursor is current
    assert tier.sync().step() is not None
    live = connected(tier, "late-1")
    # revoked while no syncer runs
    tier.fleet.registry.revoke_device(
        DeviceId("late-1"), reason="keyCompromise", now=datetime.now(UTC), actor="t"
    )
    live.pump(1.0)
    assert not live.closed  # nobody told RabbitMQ yet
    result = runner.invoke(
        rabbitmq_app,
        ["rabbitmq-sync", "--home", str(tier.home), "--conf-dir", str(tier.files.folder), "--once"],
    )
    assert result.exit_code == 0, result.output
    assert "late-1" in result.output
    live.pump(2)
    assert live.closed
    assert not Client(tier, "late-1", live_files(tier, "late-1")).connect().accepted
    # the management password never reaches the output
    password = read_secret(tier.home, SYNC_SECRET_FILE)
    assert password is not None and password not in result.output


def test_a_missing_crl_file_refuses_everyone_so_it_is_only_replaced(tier: Tier) -> None:
    """Fail closed: RabbitMQ refuses every client while the CRL file is missing; rabbitmq-sync
    replaces it atomically (never missing) and a new CRL is read without a restart."""
    files = device(tier, "crl-1")
    [crl] = list(tier.files.crl_dir.iterdir())
    saved = crl.read_bytes()
    crl.unlink()
    try:
        assert not Client(tier, "crl-1", files).connect().accepted
    finally:
        crl.write_bytes(saved)
    assert connected(tier, "crl-1", files)
    sync = tier.sync()
    sync.step()  # writes the current CRL over the file in place
    assert [p.name for p in tier.files.crl_dir.iterdir()] == [crl.name]
    assert Client(tier, "crl-1", files).connect().accepted


def presented_serial(tier: Tier) -> int:
    ctx = _ctx(tier.fleet, live_files(tier, "cert-1"))
    with socket.create_connection(("127.0.0.1", tier.port)) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sync_hands_a_renewed_server_certificate_to_rabbitmq(tier: Tier) -> None:
    device(tier, "cert-1")
    sync = tier.sync(
        reload_certificates=PemCacheClear((tier.node.node,), str(CTL), tier.node.env())
    )
    assert sync.step().server_serial is None  # the copy rabbitmq-config made is current
    old = presented_serial(tier)
    loaded = load_home(tier.home)
    new = renew_server_certificate(loaded.layout, loaded.issuer, loaded.config, datetime.now(UTC))
    assert sync.step().server_serial == new.serial_number
    assert tier.files.certfile.read_bytes() == loaded.layout.server_cert.read_bytes()
    assert tier.files.keyfile.stat().st_mode & 0o777 == 0o600
    assert sync.step().server_serial is None  # copied once
    # presented at once to new connections, which verify its chain and get in
    assert old != new.serial_number == presented_serial(tier)
    connected(tier, "cert-1").close()


def test_kicks_that_fail_while_rabbitmq_is_unreachable_are_retried_after_a_restart(
    tier: Tier,
) -> None:
    """RabbitMQ's management API down: the kick fails, the cursor stays, and a syncer
    started again later (from the cursor) drops the session."""
    files = device(tier, "down-1")
    tier.sync().step()
    before = read_cursor(tier.files)
    live = connected(tier, "down-1", files)
    tier.fleet.registry.suspend_device(DeviceId("down-1"), now=datetime.now(UTC), actor="t")
    unreachable = Management((free_port(),), "x")
    with pytest.raises(ManagementUnavailable):
        tier.sync(management=unreachable).step()
    assert read_cursor(tier.files) == before
    live.pump(0.5)
    assert not live.closed
    assert tier.sync().step().dropped == ("down-1",)
    live.pump(2)
    assert live.closed
    assert read_cursor(tier.files) != before


def test_refused_expired_certificate(tier: Tier) -> None:
    then = datetime.now(UTC) - timedelta(days=400)
    tier.fleet.enroll("old-1", now=then)
    files = live_files(tier, "old-1")
    assert Client(tier, "old-1", files).connect().connack is None  # TLS: certificate expired


def test_refused_server_auth_only_certificate(tier: Tier) -> None:
    """The fleet's own TLS server certificate (serverAuth, CN not a registered identity)."""
    layout = tier.server.layout
    got = Client(tier, "localhost", (layout.server_cert, layout.server_key)).connect()
    assert not got.accepted


def test_garbage_is_dropped_and_the_node_keeps_serving(tier: Tier) -> None:
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256))):
        with socket.create_connection(("127.0.0.1", tier.port), timeout=5) as raw:
            raw.sendall(junk)
            # closed by the node within the 5 s timeout (a TimeoutError fails the test):
            # at most a TLS alert, then the end or a reset
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(4096):
                    pass
    connected(tier, "after-junk", device(tier, "after-junk")).close()


def _sync_process(tier: Tier) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "enroll_server.cli", "broker", "rabbitmq-sync"]
    argv += ["--home", str(tier.home), "--conf-dir", str(tier.files.folder), "--interval", "0.05"]
    log = (tier.folder / "sync.log").open("ab")
    return subprocess.Popen(argv, stdout=log, stderr=log)


def _wait_closed(client: Client, seconds: float) -> float:
    started = time.monotonic()
    client.pump(seconds)
    assert client.closed, "still connected"
    return time.monotonic() - started


def test_the_sync_daemon_killed_and_restarted_catches_up(tier: Tier) -> None:
    device(tier, "kill-1")
    device(tier, "kill-2")
    proc = _sync_process(tier)
    try:
        time.sleep(3)  # started and polling (Python start-up on a loaded machine)
        live = connected(tier, "kill-1")
        tier.fleet.registry.revoke_device(
            DeviceId("kill-1"), reason="keyCompromise", now=datetime.now(UTC), actor="t"
        )
        assert _wait_closed(live, 3) < 1.0
        # SIGKILL, maybe between a kick and saving the cursor: kicks are at least once (a
        # restarted syncer may kick kill-1 again, which is harmless)
        proc.kill()
        proc.wait(10)
        live = connected(tier, "kill-2")
        tier.fleet.registry.suspend_device(DeviceId("kill-2"), now=datetime.now(UTC), actor="t")
        live.pump(0.5)
        assert not live.closed
        proc = _sync_process(tier)
        _wait_closed(live, 15)  # the restarted syncer catches up from its cursor
        assert not Client(tier, "kill-2", live_files(tier, "kill-2")).connect().accepted
        proc.terminate()  # SIGTERM: stops by itself
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = (tier.folder / "sync.log").read_text()
    drops = [line for line in log.splitlines() if "dropped sessions of" in line]
    assert any("kill-1" in line for line in drops) and any("kill-2" in line for line in drops)
    password = read_secret(tier.home, SYNC_SECRET_FILE)
    assert password is not None and password not in log


def test_sync_follows_an_issuing_ca_rollover(tier: Tier) -> None:
    """Last in this module (it changes the home's issuing CA): after `fleetpki ca rollover`,
    rabbitmq-sync writes each live issuer's CRL under its own hash (a certificate whose
    issuer has none is refused) and the new chain as the CA file: old and new certificates,
    presented alone, connect; a revoked one of the new issuer is refused."""
    device(tier, "roll-old")
    device(tier, "roll-old-gone")
    loaded = load_home(tier.home)
    crls = IssuerCrls(
        tier.fleet.registry,
        loaded,
        next_update=timedelta(hours=1),
        since_seq=read_cursor(tier.files),
    )
    sync = RabbitSync(
        crls,
        tier.files,
        tier.management(),
        lambda: datetime.now(UTC),
        reload_certificates=PemCacheClear((tier.node.node,), str(CTL), tier.node.env()),
        ca_chain=loaded.layout.chain,
    )
    sync.step()
    rolled = CliRunner().invoke(fleetpki_app, ["ca", "rollover", "--home", str(tier.home)])
    assert rolled.exit_code == 0, rolled.output
    assert sync.step().crl_number is not None
    assert tier.files.cafile.read_bytes() == loaded.layout.chain.read_bytes()
    assert len(list(tier.files.crl_dir.iterdir())) == 2
    tier.fleet.ca = replace(tier.fleet.ca, issuing=load_home(tier.home).issuer)
    device(tier, "roll-new")
    device(tier, "roll-gone")
    connected(tier, "roll-old").close()
    connected(tier, "roll-new").close()
    # A revocation of each issuer's certificate reaches RabbitMQ through that issuer's CRL.
    for name in ("roll-gone", "roll-old-gone"):
        tier.fleet.registry.revoke_device(
            DeviceId(name), reason="keyCompromise", now=datetime.now(UTC), actor="t"
        )
    assert sync.step().crl_number is not None
    for name in ("roll-gone", "roll-old-gone"):
        assert not Client(tier, name, live_files(tier, name)).connect().accepted, name
    connected(tier, "roll-old").close()
