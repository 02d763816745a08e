"""Broker test harness: a fleet on disk (CA files, real registry), a broker, real MQTT clients."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from enroll_server.broker import BrokerConfig, KeepalivePolicy, RunningBroker, start_broker
from enroll_server.broker.acl import ADMISSION_KEY
from enroll_server.broker.policy import Admission, common_name
from enroll_server.pki.ca import build_server_certificate
from enroll_server.pki.keys import KeyType, PrivateKey, generate_key, private_key_pem
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.registry import Registry
from fleetpki.identity import SERVICE_URN_PREFIX, DeviceId
from fleetpki.topics import Role
from tests.pki_helpers import MemoryCa, issued_record, make_ca

HOST = "127.0.0.1"

# paho-mqtt 2.x reports a 3.1.1 CONNACK return code as the MQTT 5 reason code it maps to.
PAHO_ACCEPTED = 0
PAHO_UNSUPPORTED_PROTOCOL = 132  # 3.1.1 code 0x01
PAHO_IDENTIFIER_REJECTED = 133  # 3.1.1 code 0x02
PAHO_NOT_AUTHORIZED = 135  # 3.1.1 code 0x05


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Creds:
    """A client identity on disk: certificate (+ chain) and key files."""

    device_id: str
    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path

    def tls_context(self, ca_file: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.load_cert_chain(str(self.cert_path), str(self.key_path))
        return ctx


class Fleet:
    """Our CA's files in a folder and a real registry next to them."""

    def __init__(self, ca: MemoryCa, root: Path) -> None:
        self.ca = ca
        self.root = root
        self.ca_file = root / "chain.pem"
        self.ca_file.write_bytes(ca.chain_pem())
        self.server_cert = root / "server.pem"
        self.server_cert.write_bytes(pem(ca.server_cert) + pem(ca.issuing.cert))
        self.server_key = root / "server.key"
        self.server_key.write_bytes(private_key_pem(ca.server_key, None))
        self.registry_path = root / "registry.db"
        self.registry = Registry.open(self.registry_path)

    def config(self, **overrides: Any) -> BrokerConfig:
        base: dict[str, Any] = {
            "server_cert": self.server_cert,
            "server_key": self.server_key,
            "ca_file": self.ca_file,
            "registry_path": self.registry_path,
            "host": HOST,
            "port": 0,
            "connect_timeout": 1.0,
            "handshake_timeout": 2.0,
            "revocation_poll_interval": 0.1,
            "keepalive": KeepalivePolicy(),
        }
        base.update(overrides)
        return BrokerConfig(**base)

    def _write(self, device_id: str, cert: x509.Certificate, key: PrivateKey, label: str) -> Creds:
        folder = self.root / "clients" / label
        folder.mkdir(parents=True, exist_ok=True)
        cert_path = folder / "cert.pem"
        key_path = folder / "key.pem"
        cert_path.write_bytes(pem(cert) + pem(self.ca.issuing.cert))
        key_path.write_bytes(private_key_pem(key, None))
        return Creds(device_id, cert, key, cert_path, key_path)

    def issue(
        self,
        device_id: str,
        *,
        role: str = "device",
        register: bool = True,
        now: datetime | None = None,
        validity: timedelta | None = None,
        label: str | None = None,
        batch_id: str | None = None,
    ) -> Creds:
        """A certificate from our issuing CA for `device_id`, recorded in the registry."""
        now = now or datetime.now(UTC)
        key = generate_key(KeyType.EC_P256)
        profile = DeviceProfile(validity=validity) if validity else DeviceProfile()
        cert = build_device_certificate(
            key.public_key(),
            DeviceId(device_id),
            self.ca.issuing,
            now,
            profile,
            Role(role),
        )
        if register:
            did = DeviceId(device_id)
            if self.registry.get_device(did) is None:
                self.registry.add_device(did, role=role, batch_id=batch_id, now=now, actor="test")
            self.registry.record_issuance(
                issued_record(cert, device_id),
                consume_token_hash=None,
                supersedes_serial=None,
                now=now,
                actor="test",
            )
        return self._write(device_id, cert, key, label or f"{device_id}-{cert.serial_number:x}")

    def foreign(self, device_id: str) -> Creds:
        """A well-formed device certificate from another CA."""
        other = make_ca()
        cert, key = other.device_cert(device_id)
        return self._write(device_id, cert, key, f"foreign-{device_id}")

    def server_auth_only(self, device_id: str) -> Creds:
        """A certificate from our CA with CN = device id but the serverAuth EKU only."""
        key = generate_key(KeyType.EC_P256)
        cert = build_server_certificate(
            key.public_key(), self.ca.issuing, [device_id], datetime.now(UTC)
        )
        return self._write(device_id, cert, key, f"server-{device_id}")

    def revoke(self, device_id: str) -> None:
        self.registry.revoke_device(
            DeviceId(device_id), reason="keyCompromise", now=datetime.now(UTC), actor="test"
        )

    def suspend(self, device_id: str) -> None:
        self.registry.suspend_device(DeviceId(device_id), now=datetime.now(UTC), actor="test")

    def resume(self, device_id: str) -> None:
        self.registry.resume_device(DeviceId(device_id), now=datetime.now(UTC), actor="test")


@pytest.fixture
def fleet(ca: MemoryCa, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(ca, tmp_path)
    yield f
    f.registry.close()


@pytest.fixture
async def broker(fleet: Fleet) -> AsyncIterator[RunningBroker]:
    running = await start_broker(fleet.config())
    yield running
    await running.stop()


async def eventually(predicate: Any, timeout: float = 3.0, what: str = "condition") -> None:
    """Poll `predicate()` without blocking the loop (the broker runs on it) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- paho-mqtt: a real client on its own network thread --------------------------------------


@dataclass
class PahoDevice:
    """paho-mqtt 2.x client driven from async tests without blocking the broker's loop."""

    creds: Creds | None
    port: int
    ca_file: Path
    client_id: str | None = None
    clean_session: bool = True
    keepalive: int = 60
    will: tuple[str, bytes] | None = None
    protocol: int = paho.MQTTv311
    connack: list[int] = field(default_factory=list)
    disconnects: list[Any] = field(default_factory=list)
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    client: paho.Client | None = None
    _error: list[BaseException] = field(default_factory=list)

    def _build(self) -> paho.Client:
        cid = (
            self.client_id
            if self.client_id is not None
            else (self.creds.device_id if self.creds else "anon")
        )
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cid,
            clean_session=self.clean_session if self.protocol != paho.MQTTv5 else None,
            protocol=self.protocol,
        )
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if self.creds is not None:
            ctx.load_cert_chain(str(self.creds.cert_path), str(self.creds.key_path))
        c.tls_set_context(ctx)
        if self.will is not None:
            c.will_set(self.will[0], self.will[1], qos=1)
        c.reconnect_delay_set(60, 120)  # never reconnect within a test

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            self.connack.append(int(rc.value) if hasattr(rc, "value") else int(rc))

        def on_disconnect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            self.disconnects.append(rc)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            self.messages.put((msg.topic, msg.payload))

        def on_subscribe(client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
            self.subacks[mid] = [int(c.value) for c in codes]

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = on_message
        c.on_subscribe = on_subscribe
        return c

    async def connect(self, timeout: float = 5.0) -> int | None:
        """Connect; return the CONNACK code, or None if the connection failed before one."""
        self.client = self._build()
        self.client.connect_async(HOST, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        await eventually(lambda: self.connack or self.disconnects, timeout, "CONNACK or disconnect")
        return self.connack[0] if self.connack else None

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected()

    async def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        assert self.client is not None
        _, mid = self.client.subscribe(topic, qos)
        await eventually(lambda: mid in self.subacks, 3.0, f"SUBACK for {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        assert self.client is not None
        self.client.publish(topic, payload, qos=qos)

    async def next_message(self, timeout: float = 3.0) -> tuple[str, bytes] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.messages.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.01)
        return None

    async def close(self) -> None:
        if self.client is None:
            return
        client = self.client
        self.client = None
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)


class Witness:
    """A connected device that must stay undisturbed while others misbehave."""

    def __init__(self, device: PahoDevice) -> None:
        self.device = device
        self.device_id = device.creds.device_id if device.creds else "?"
        self.rounds = 0

    @classmethod
    async def start(
        cls, fleet: Fleet, broker: RunningBroker, device_id: str = "witness"
    ) -> Witness:
        creds = fleet.issue(device_id)
        dev = PahoDevice(creds, broker.port, fleet.ca_file)
        assert await dev.connect() == 0
        assert await dev.subscribe(f"devices/{device_id}/#") == [1]
        return cls(dev)

    async def assert_undisturbed(self) -> None:
        """Still connected since start, never disconnected, and its messages still flow."""
        assert self.device.disconnects == [], f"witness was disconnected: {self.device.disconnects}"
        assert self.device.connected
        self.rounds += 1
        payload = f"ping {self.rounds}".encode()
        self.device.publish(f"devices/{self.device_id}/telemetry", payload)
        got = await self.device.next_message()
        assert got == (f"devices/{self.device_id}/telemetry", payload)

    async def close(self) -> None:
        await self.device.close()


@pytest.fixture
async def witness(fleet: Fleet, broker: RunningBroker) -> AsyncIterator[Witness]:
    w = await Witness.start(fleet, broker)
    yield w
    await w.close()


# -- raw TLS and mosquitto command-line clients ------------------------------------------------


class RawTls:
    """A blocking TLS socket driven through threads: exact bytes in, exact bytes (or EOF) out.

    Blocking `ssl` sockets report a server-side close at once (b"" or an error), where an
    asyncio client would wait for its own TLS shutdown timeout.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, port: int, ca_file: Path, creds: Creds | None) -> RawTls:
        def connect() -> ssl.SSLSocket:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            if creds is not None:
                ctx.load_cert_chain(str(creds.cert_path), str(creds.key_path))
            raw = socket.create_connection((HOST, port), timeout=5)
            return ctx.wrap_socket(raw, server_hostname=HOST)

        return cls(await asyncio.to_thread(connect))

    async def send(self, data: bytes) -> None:
        await asyncio.to_thread(self.sock.sendall, data)

    async def recv_exactly(self, n: int, timeout: float = 3.0) -> bytes:
        def recv() -> bytes:
            self.sock.settimeout(timeout)
            out = b""
            while len(out) < n:
                chunk = self.sock.recv(n - len(out))
                if not chunk:
                    break
                out += chunk
            return out

        return await asyncio.to_thread(recv)

    async def until_closed(self, timeout: float = 3.0) -> bytes:
        """Everything the server sends until it closes; TimeoutError if it stays open."""

        def recv() -> bytes:
            deadline = time.monotonic() + timeout
            out = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"server kept the connection open; got {out!r}")
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(4096)
                except TimeoutError:
                    continue
                except (ssl.SSLError, ConnectionError):
                    return out
                if not chunk:
                    return out
                out += chunk

        return await asyncio.to_thread(recv)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_packet(
    client_id: str,
    *,
    level: int = 4,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """A CONNECT built by hand (MQTT 3.1.1 section 3.1; level 5 adds empty properties)."""

    def s(value: bytes) -> bytes:
        return len(value).to_bytes(2, "big") + value

    flags = (0x02 if clean else 0) | (0x04 | 0x08 if will else 0)  # will QoS 1
    var = s(b"MQTT") + bytes([level, flags]) + keepalive.to_bytes(2, "big")
    if level == 5:
        var += b"\x00"  # property length 0
    payload = s(client_id.encode())
    if will is not None:
        if level == 5:
            payload += b"\x00"
        payload += s(will[0].encode()) + s(will[1])
    body = var + payload
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


async def mosquitto(
    tool: str, fleet: Fleet, port: int, creds: Creds | None, *args: str, timeout: float = 10.0
) -> tuple[int, str]:
    """Run mosquitto_pub / mosquitto_sub; returns (exit status, stdout+stderr)."""
    cmd = [tool, "-h", HOST, "-p", str(port), "--cafile", str(fleet.ca_file)]
    if creds is not None:
        cmd += ["--cert", str(creds.cert_path), "--key", str(creds.key_path)]
    cmd += list(args)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode(errors="replace")
    return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace")


def threads_alive() -> int:
    return threading.active_count()


# -- stock amqtt 0.12.1, configured as well as its public configuration allows ----------------


class StockCertAuth(BaseAuthPlugin):
    """What a careful amqtt 0.12.1 user writes: the peer certificate's CN must be the client id.

    Used only to show, next to each hardening test, that stock amqtt fails it.
    """

    async def authenticate(self, *, session: Session) -> bool:
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return False
        cert = x509.load_der_x509_certificate(der)
        cn = common_name(cert)
        if cn is None or cn != session.client_id:
            return False
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        role = Role.SERVICE if any(u.startswith(SERVICE_URN_PREFIX) for u in uris) else Role.DEVICE
        session.attributes[ADMISSION_KEY] = Admission(
            cn, role, cert.serial_number, cert.not_valid_after_utc
        )
        return True


class StockBroker:
    """Stock amqtt Broker on a TLS listener with our CA, StockCertAuth and our topic plugin."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.port: int = broker._servers["default"].instance.sockets[0].getsockname()[1]

    @classmethod
    async def start(cls, fleet: Fleet, max_connections: int = 0) -> StockBroker:
        config = {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{HOST}:0",
                    "ssl": True,
                    "cafile": str(fleet.ca_file),
                    "certfile": str(fleet.server_cert),
                    "keyfile": str(fleet.server_key),
                    "max_connections": max_connections,
                }
            },
            "plugins": {
                "tests.integration.broker_harness.StockCertAuth": {},
                "enroll_server.broker.acl.TopicPolicyPlugin": {},
            },
        }
        broker = Broker(config)
        await broker.start()
        return cls(broker)

    async def stop(self) -> None:
        try:
            async with asyncio.timeout(10):
                await self.broker.shutdown()
        except TimeoutError:
            pass
