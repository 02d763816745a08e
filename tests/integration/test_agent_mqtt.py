"""The agent's MQTT link against a real mosquitto (require_certificate) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from device_agent.backoff import Backoff
from device_agent.cancel import cancel_all
from device_agent.errors import BrokerRefused
from device_agent.keys import KeyType, generate_key, private_key_pem
from device_agent.mqtt_link import MqttLink
from enroll_server.pki.keys import private_key_pem as server_key_pem
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa

MOSQUITTO = Path("/usr/sbin/mosquitto")


@pytest.fixture(autouse=True)
def _mosquitto_installed() -> None:
    # .ci/run installs mosquitto: its absence must fail the run, not skip these tests.
    assert MOSQUITTO.exists(), "mosquitto is required (apt-get install mosquitto)"


DEV = DeviceId("dev-000001")
FAST = Backoff(base=0.2, factor=2.0, cap=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


@dataclass
class Mosquitto:
    """A mosquitto process with an mTLS listener; restartable on the same port."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def write_conf(self, extra: str = "") -> None:
        f = self.folder
        (f / "mosquitto.conf").write_text(
            # Stay the test's user: the default drop to 'mosquitto' could not read tmp_path.
            f"user {getpass.getuser()}\n"
            f"per_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {f / 'cas.pem'}\n"
            f"certfile {f / 'server-chain.pem'}\n"
            f"keyfile {f / 'server-key.pem'}\n"
            "require_certificate true\n"
            "tls_version tlsv1.2\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type all\n" + extra
        )

    def start(self) -> None:
        with open(self.folder / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.folder / "mosquitto.conf")],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start: " + self.log())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def log(self) -> str:
        return (self.folder / "mosquitto.log").read_text(errors="replace")


@dataclass
class Creds:
    cert: Path
    key: Path


def device_creds(ca: MemoryCa, folder: Path, name: str, device: str = DEV.value) -> Creds:
    key = generate_key(KeyType.EC_P256)
    cert, _ = ca.device_cert(device, key=key)  # type: ignore[arg-type]
    c = Creds(folder / f"{name}-cert.pem", folder / f"{name}-key.pem")
    c.cert.write_bytes(pem(cert, ca.issuing.cert))
    c.key.write_bytes(private_key_pem(key))
    c.key.chmod(0o600)
    return c


@pytest.fixture
def broker_dir(ca: MemoryCa, tmp_path: Path) -> Path:
    folder = tmp_path / "broker"
    folder.mkdir()
    (folder / "cas.pem").write_bytes(pem(ca.root.cert, ca.issuing.cert))
    (folder / "server-chain.pem").write_bytes(pem(ca.server_cert, ca.issuing.cert))
    (folder / "server-key.pem").write_bytes(server_key_pem(ca.server_key, None))
    (tmp_path / "ca.pem").write_bytes(pem(ca.root.cert))
    return folder


@pytest.fixture
def mosquitto(broker_dir: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(broker_dir, free_port())
    m.write_conf("use_identity_as_username true\nallow_anonymous false\n")
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
async def observer(
    ca: MemoryCa, mosquitto: Mosquitto, tmp_path: Path
) -> AsyncIterator[aiomqtt.Client]:
    """A backend-style client that watches telemetry and sends commands."""
    import ssl

    creds = device_creds(ca, tmp_path, "observer", "observer")
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    async with aiomqtt.Client(
        "localhost", mosquitto.port, identifier="observer", tls_context=ctx
    ) as client:
        await client.subscribe("devices/+/telemetry", qos=1)
        yield client


def make_link(tmp_path: Path, port: int, creds: Creds, **kw: object) -> MqttLink:
    return MqttLink(
        DEV,
        "localhost",
        port,
        tmp_path / "ca.pem",
        lambda: (creds.cert, creds.key),
        backoff=FAST,
        timeout=3.0,
        **kw,  # type: ignore[arg-type]
    )


async def next_payloads(client: aiomqtt.Client, n: int, timeout: float = 10) -> list[dict]:
    out: list[dict] = []
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            assert str(msg.topic) == f"devices/{DEV}/telemetry"
            out.append(json.loads(msg.payload))  # type: ignore[arg-type]
            if len(out) == n:
                return out
    return out


async def test_telemetry_and_commands_over_mtls(
    ca: MemoryCa,
    mosquitto: Mosquitto,
    observer: aiomqtt.Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    commands: list[bytes] = []
    receipts: list[bytes] = []

    def delivered(payload: bytes) -> None:
        receipts.append(payload)
        if len(receipts) == 1:  # an application bug must not end the session
            raise RuntimeError("receipt handler bug")

    link = make_link(
        tmp_path,
        mosquitto.port,
        device_creds(ca, tmp_path, "dev"),
        on_command=commands.append,
        on_delivered=delivered,
    )
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(10):
            await link.connected.wait()
        link.enqueue(b'{"n": 1}')
        link.enqueue(b'{"n": 2}')
        assert [p["n"] for p in await next_payloads(observer, 2)] == [1, 2]
        await observer.publish(f"devices/{DEV}/commands", b"reboot", qos=1)
        async with asyncio.timeout(5):
            while not commands:
                await asyncio.sleep(0.02)
        assert commands == [b"reboot"]
        assert link.queued == 0 and link.published == 2
        # A delivery receipt per PUBACK, in order; the failing handler logged once.
        assert receipts == [b'{"n": 1}', b'{"n": 2}']
        assert caplog.text.count("on_delivered handler failed") == 1
    finally:
        # cancel_all: one cancel may be lost on 3.11 (CPython gh-86296) while aiomqtt's
        # wait_for completes in the same loop iteration, and the link would reconnect on.
        await cancel_all([task])
    # mosquitto saw the certificate CN as the user name
    assert (
        f"u'{DEV}'" in mosquitto.log()
        or f"as {DEV}" in mosquitto.log()
        or DEV.value in mosquitto.log()
    )


async def test_connack_not_authorized_is_a_refusal(
    ca: MemoryCa, broker_dir: Path, tmp_path: Path
) -> None:
    """mosquitto without use_identity_as_username and no anonymous access answers the
    agent's (user-less) CONNECT with CONNACK 5: the link gives up at once, no retry loop."""
    m = Mosquitto(broker_dir, free_port())
    m.write_conf("allow_anonymous false\n")
    m.start()
    try:
        link = make_link(tmp_path, m.port, device_creds(ca, tmp_path, "dev"))
        started = time.monotonic()
        with pytest.raises(BrokerRefused) as info:
            async with asyncio.timeout(10):
                await link.run()
        assert info.value.code in (5, 135)
        assert "not authorized" in str(info.value)
        assert time.monotonic() - started < 3
        # Exactly one MQTT attempt. (Not "New connection from": the start-up probe's bare TCP
        # connect is logged that way too when mosquitto sees it before it closes.)
        assert m.log().count("Sending CONNACK") == 1
    finally:
        m.stop()


def _crl(ca: MemoryCa, serials: list[int]) -> bytes:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.issuing.cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(now + timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(minutes=1))
            .build()
        )
    signer = ca.issuing.key
    return builder.sign(signer, hashes.SHA256()).public_bytes(Encoding.PEM)  # type: ignore[arg-type]


async def test_revoked_certificate_tls_alert_is_a_refusal(
    ca: MemoryCa, broker_dir: Path, tmp_path: Path
) -> None:
    creds = device_creds(ca, tmp_path, "dev")
    serial = x509.load_pem_x509_certificates(creds.cert.read_bytes())[0].serial_number
    (broker_dir / "crl.pem").write_bytes(_crl(ca, [serial]))
    m = Mosquitto(broker_dir, free_port())
    m.write_conf(f"use_identity_as_username true\ncrlfile {broker_dir / 'crl.pem'}\n")
    m.start()
    try:
        link = make_link(tmp_path, m.port, creds)
        with pytest.raises(BrokerRefused) as info:
            async with asyncio.timeout(20):
                await link.run()
        assert "revoked" in str(info.value)
    finally:
        m.stop()


async def _observe(ca: MemoryCa, port: int, tmp_path: Path) -> aiomqtt.Client:
    import ssl

    creds = device_creds(ca, tmp_path, "observer2", "observer2")
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    return aiomqtt.Client("localhost", port, identifier="observer2", tls_context=ctx)


async def test_broker_down_at_start_then_up_delivers_the_bounded_queue_in_order(
    ca: MemoryCa, broker_dir: Path, tmp_path: Path
) -> None:
    m = Mosquitto(broker_dir, free_port())
    m.write_conf("use_identity_as_username true\n")
    link = make_link(tmp_path, m.port, device_creds(ca, tmp_path, "dev"), queue_size=3)
    task = asyncio.create_task(link.run())
    try:
        for n in range(5):
            link.enqueue(json.dumps({"n": n}).encode())
        await asyncio.sleep(1.0)  # a few refused TCP connects, with backoff
        assert not link.connected.is_set()
        assert link.dropped == 2 and link.queued == 3
        m.start()
        async with await _observe(ca, m.port, tmp_path) as obs:
            await obs.subscribe("devices/+/telemetry", qos=1)
            got = await next_payloads(obs, 3)
        assert [p["n"] for p in got] == [2, 3, 4]  # oldest dropped, order kept
        assert link.connections == 1
    finally:
        # cancel_all: one cancel may be lost on 3.11 (CPython gh-86296) while aiomqtt's
        # wait_for completes in the same loop iteration, and the link would reconnect on.
        await cancel_all([task])
        m.stop()


async def test_broker_restart_mid_session_loses_no_queued_telemetry(
    ca: MemoryCa, broker_dir: Path, tmp_path: Path
) -> None:
    m = Mosquitto(broker_dir, free_port())
    m.write_conf("use_identity_as_username true\n")
    m.start()
    receipts: list[bytes] = []
    link = make_link(
        tmp_path, m.port, device_creds(ca, tmp_path, "dev"), on_delivered=receipts.append
    )
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(10):
            await link.connected.wait()
        m.stop()
        async with asyncio.timeout(10):
            while link.connected.is_set():
                await asyncio.sleep(0.05)
        link.enqueue(b'{"n": 10}')
        link.enqueue(b'{"n": 11}')
        m.start()
        async with await _observe(ca, m.port, tmp_path) as obs:
            await obs.subscribe("devices/+/telemetry", qos=1)
            got = await next_payloads(obs, 2)
        assert [p["n"] for p in got] == [10, 11]
        assert link.connections == 2
        # Receipts only for what the restarted broker acknowledged, each once.
        async with asyncio.timeout(5):
            while len(receipts) < 2:
                await asyncio.sleep(0.02)
        assert receipts == [b'{"n": 10}', b'{"n": 11}']
    finally:
        # cancel_all: one cancel may be lost on 3.11 (CPython gh-86296) while aiomqtt's
        # wait_for completes in the same loop iteration, and the link would reconnect on.
        await cancel_all([task])
        m.stop()


async def test_rotate_reconnects_with_new_credentials(
    ca: MemoryCa, mosquitto: Mosquitto, observer: aiomqtt.Client, tmp_path: Path
) -> None:
    old, new = device_creds(ca, tmp_path, "old"), device_creds(ca, tmp_path, "new")
    current = [old]
    served: list[Path] = []

    def credentials() -> tuple[Path, Path]:
        served.append(current[0].cert)
        return current[0].cert, current[0].key

    link = MqttLink(
        DEV,
        "localhost",
        mosquitto.port,
        tmp_path / "ca.pem",
        credentials,
        backoff=FAST,
        timeout=3.0,
    )
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(10):
            await link.connected.wait()
        link.enqueue(b'{"n": 1}')
        await next_payloads(observer, 1)
        # The observer may see message 1 before the link has its PUBACK; rotating then would
        # (rightly, at-least-once) send it again on the new session. Wait for the PUBACK.
        async with asyncio.timeout(5):
            while link.queued:
                await asyncio.sleep(0.02)
        current[0] = new
        link.rotate()
        link.enqueue(b'{"n": 2}')
        assert [p["n"] for p in await next_payloads(observer, 1)] == [2]
        async with asyncio.timeout(5):
            while link.connections < 2:
                await asyncio.sleep(0.02)
        assert served == [old.cert, new.cert]
    finally:
        # cancel_all: one cancel may be lost on 3.11 (CPython gh-86296) while aiomqtt's
        # wait_for completes in the same loop iteration, and the link would reconnect on.
        await cancel_all([task])
