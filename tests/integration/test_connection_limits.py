"""Connection limits (connection_limits.py) and connection handling of the listeners, on the wire.

Deadlines (a short one configured here), the per-source cap, a client's half-close (FIN or
TLS close_notify after its request: the reply still comes), and the bounded buffer of a
connection whose enrollment waits for its commit.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from enroll_server.est.front import MAX_HEAD
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import hash_secret, new_secret
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.registry import Registry
from enroll_server.transport.connection_limits import ConnectionLimits, Guard
from enroll_server.web.app import MAX_BODY
from fleetpki.identity import DeviceId
from tests.integration.test_est import leaf
from tests.integration.test_est_front import (
    RawReply,
    Wire,
    assert_issued,
    csr_body,
    enroll_request,
    get,
    head,
)
from tests.live_server import LiveServer, make_home, start_live_server

HEAD, IDLE = 0.5, 1.0


def short_deadlines(**extra: Any) -> dict[str, Any]:
    return {
        "head_timeout": timedelta(seconds=HEAD),
        "idle_timeout": timedelta(seconds=IDLE),
        **extra,
    }


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_live_server(tmp_path / "home", **short_deadlines())
    try:
        yield srv
    finally:
        srv.stop()


# A long idle deadline next to the short head one: what closes early here is not it.
LONG_IDLE = 4.0
SOON = 2.5


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_live_server(
        tmp_path / "home", **short_deadlines(idle_timeout=timedelta(seconds=LONG_IDLE))
    )
    try:
        yield srv
    finally:
        srv.stop()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True once the server ends the connection (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True
    return False


def drip(sock: socket.socket, data: bytes, every: float, until: float) -> bool:
    """Send `data` a byte every `every` seconds; True if the server closed before `until`."""
    for byte in data:
        if time.monotonic() > until:
            return False
        try:
            sock.sendall(bytes([byte]))
        except (ConnectionError, ssl.SSLError):
            return True
        if closed_within(sock, every):
            return True
    return False


# --- the guard, pure ---------------------------------------------------------------------------
def test_per_source_cap_groups_ipv6_by_64_and_spares_loopback() -> None:
    guard = Guard(ConnectionLimits(max_per_source=2))
    assert guard.admit(("2001:db8:1:2::1", 1, 0, 0)) == "src:2001:db8:1:2::/64"
    assert guard.admit(("2001:db8:1:2:ffff::9", 1, 0, 0)) is not None
    assert guard.admit(("2001:db8:1:2::77", 1, 0, 0)) is None  # the same /64: full
    assert guard.admit(("2001:db8:1:3::1", 1, 0, 0)) is not None  # the next /64
    assert guard.admit(("192.0.2.1", 1)) is not None
    assert guard.admit(("::ffff:192.0.2.1", 1, 0, 0)) is not None  # IPv4-mapped: same host
    assert guard.admit(("192.0.2.1", 2)) is None
    guard.release("src:192.0.2.1")
    assert guard.admit(("192.0.2.1", 3)) == "src:192.0.2.1"
    for _ in range(10):  # this machine (the simulator, a local proxy) is not capped...
        assert guard.admit(("127.0.0.1", 1)) == ""
        assert guard.admit(("::1", 1, 0, 0)) == ""
    capped = Guard(ConnectionLimits(max_per_source=1, cap_loopback=True))
    assert capped.admit(("127.0.0.1", 1)) is not None
    assert capped.admit(("127.0.0.1", 2)) is None  # ...unless asked to
    with pytest.raises(ValueError, match="max_per_source"):
        ConnectionLimits(max_per_source=0)


# --- deadlines ---------------------------------------------------------------------------------
def test_http_listener_closes_silent_idle_and_slow_connections(server: LiveServer) -> None:
    port = server.handle.http_port
    opened = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", port)) as silent,
        socket.create_connection(("127.0.0.1", port)) as kept,
        socket.create_connection(("127.0.0.1", port)) as slow_body,
    ):
        kept.sendall(get("/healthz"))
        kept.settimeout(5)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        slow_body.sendall(
            b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
            b"Content-Length: 100\r\n\r\n0123456789"
        )
        # A TCP connection that never says anything: closed at the idle deadline, not before.
        assert closed_within(silent, IDLE + 3)
        assert time.monotonic() - opened >= IDLE
        # Answered, kept alive, then silent: the same.
        assert closed_within(kept, 3)
        assert time.monotonic() - answered >= IDLE
        # A body that stops arriving.
        assert closed_within(slow_body, 3)


def test_head_sent_a_byte_at_a_time_is_closed_at_the_head_deadline(patient: LiveServer) -> None:
    """Closed at the head deadline though bytes keep coming, on the plain listener and on
    the EST listener (whose clock runs on when the front end hands over to aiohttp)."""
    with socket.create_connection(("127.0.0.1", patient.handle.http_port)) as dripping:
        started = time.monotonic()
        assert drip(dripping, get("/healthz") * 10, 0.1, started + LONG_IDLE + 3)
        assert HEAD <= time.monotonic() - started < SOON
    with Wire(patient) as wire:
        started = time.monotonic()
        wire.send(b"GET /healthz HTTP/1.1\r\n")  # handed over at once (not an enrollment)
        assert drip(wire.sock, b"X-Slow: " + b"a" * 200, 0.1, started + LONG_IDLE + 3)
        assert HEAD <= time.monotonic() - started < SOON


def test_est_body_that_stops_arriving_is_closed(server: LiveServer) -> None:
    token = server.mint_device("slow-body")
    with Wire(server) as wire:
        body = csr_body("slow-body")
        wire.send(head("slow-body", token, length=len(body)) + body[:10])
        started = time.monotonic()
        assert closed_within(wire.sock, IDLE + 3)
        assert time.monotonic() - started >= IDLE - 0.1


def test_admin_listener_closes_an_idle_connection(server: LiveServer) -> None:
    raw = socket.create_connection(("127.0.0.1", server.handle.admin_port), timeout=5)
    with server.client_ssl().wrap_socket(raw, server_hostname="localhost") as tls:
        started = time.monotonic()
        assert closed_within(tls, IDLE + 3)
        assert time.monotonic() - started >= IDLE - 0.1


def test_broker_takes_the_head_deadline_for_tls_and_connect(tmp_path: Path) -> None:
    srv = start_live_server(tmp_path / "home", broker=True, **short_deadlines())
    try:
        with socket.create_connection(("127.0.0.1", srv.mqtt_port), timeout=5) as silent:
            started = time.monotonic()
            silent.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes
            assert closed_within(silent, HEAD + 3)  # not the broker's own 10 s
            assert time.monotonic() - started >= HEAD - 0.1
    finally:
        srv.stop()


# --- per-source cap ----------------------------------------------------------------------------
def tls_connect(server: LiveServer, port: int, source: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    return server.client_ssl().wrap_socket(raw, server_hostname="localhost")


def test_per_source_cap_on_every_listener(tmp_path: Path) -> None:
    srv = start_live_server(tmp_path / "home", max_per_source=3, cap_loopback=True)
    try:
        with contextlib.ExitStack() as held:
            est = [held.enter_context(tls_connect(srv, srv.handle.est_port)) for _ in range(3)]
            with pytest.raises((ssl.SSLError, ConnectionError)):
                tls_connect(srv, srv.handle.est_port).close()  # the fourth from this address
            # Another source address is not affected.
            with tls_connect(srv, srv.handle.est_port, "127.0.0.2") as other:
                other.sendall(get("/healthz"))
                assert other.recv(65536).startswith(b"HTTP/1.1 200")
            plain = [
                held.enter_context(socket.create_connection(("127.0.0.1", srv.handle.http_port)))
                for _ in range(3)
            ]
            with socket.create_connection(("127.0.0.1", srv.handle.http_port)) as fourth:
                fourth.sendall(get("/healthz"))
                assert closed_within(fourth, 3)
            plain[0].sendall(get("/healthz"))
            plain[0].settimeout(5)
            assert plain[0].recv(65536).startswith(b"HTTP/1.1 200")
            # One closes: its place is free again.
            est.pop().close()
            deadline = time.monotonic() + 5
            while True:
                try:
                    with tls_connect(srv, srv.handle.est_port) as again:
                        again.sendall(get("/healthz"))
                        assert again.recv(65536).startswith(b"HTTP/1.1 200")
                    break
                except (ssl.SSLError, ConnectionError):
                    assert time.monotonic() < deadline, "the closed connection's place stayed taken"
                    time.sleep(0.05)
    finally:
        srv.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))


def test_honest_device_enrolls_while_one_address_holds_many_idle_connections(
    tmp_path: Path,
) -> None:
    """`fleetpki serve` with few file descriptors (EST and the broker in one process): 400
    idle connections from one address must not lock every device out."""
    home = tmp_path / "home"
    ports = {p: _free_port() for p in ("est_port", "http_port", "mqtt_port", "admin_port")}
    layout = make_home(home, max_per_source=16, cap_loopback=True, **ports)
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_limit_fds,
    )
    attacker: list[socket.socket] = []
    try:
        ctx = ssl.create_default_context(cafile=str(layout.root_cert))
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", ports["mqtt_port"]), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "serve did not come up"
                time.sleep(0.2)
        for i in range(400):
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", ports["est_port"]), timeout=2)
                attacker.append(sock)
                if i < 20:  # a few complete their handshake and then idle
                    with contextlib.suppress(OSError, ssl.SSLError):
                        attacker[-1] = ctx.wrap_socket(sock, server_hostname="localhost")
                else:  # the rest stop inside it
                    with contextlib.suppress(OSError):
                        sock.sendall(b"\x16\x03\x01\x02\x00\x01")
        # The device, from another address: enrolls over EST, then reaches the broker.
        token = new_secret()
        now = datetime.now(UTC)
        with Registry.open(layout.registry) as registry:
            registry.add_device(DeviceId("honest-1"), batch_id=None, now=now, actor="test")
            registry.add_token(DeviceId("honest-1"), hash_secret(token), now + timedelta(1), now)
        key = generate_key(KeyType.EC_P256)
        raw = socket.create_connection(
            ("127.0.0.1", ports["est_port"]), timeout=10, source_address=("127.0.0.2", 0)
        )
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(enroll_request("honest-1", token, csr_body("honest-1", key)))
            reply = b""
            while (end := reply.find(b"\r\n\r\n")) < 0 or len(reply) < end + 4 + int(
                parse(reply).headers["content-length"]
            ):
                chunk = tls.recv(65536)
                assert chunk, reply
                reply += chunk
        assert parse(reply).status == 200, reply[:300]
        cert = leaf(decode_certs_only(parse(reply).body))
        cert_file, key_file = tmp_path / "dev.pem", tmp_path / "dev.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        mqtt = ssl.create_default_context(cafile=str(layout.root_cert))
        mqtt.load_cert_chain(cert_file, key_file)
        raw = socket.create_connection(
            ("127.0.0.1", ports["mqtt_port"]), timeout=10, source_address=("127.0.0.2", 0)
        )
        with mqtt.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() is not None  # the broker's handshake completed
    finally:
        for sock in attacker:
            sock.close()
        proc.terminate()
        proc.communicate(timeout=20)


# --- half-close ----------------------------------------------------------------------------------
class BioClient:
    """A TLS client over memory BIOs, to end its input exactly as asked: FIN, close_notify."""

    def __init__(self, server: LiveServer, port: int) -> None:
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = server.client_ssl().wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.raw.sendall(data)

    def _fill(self) -> bool:
        data = self.raw.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def fin(self) -> None:
        self.raw.shutdown(socket.SHUT_WR)

    def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        self._flush()

    def read_to_end(self) -> bytes:
        """Everything the server sends until it closes (close_notify, FIN or reset)."""
        out = b""
        while True:
            try:
                chunk = self.tls.read(65536)
                if not chunk:
                    return out  # close_notify
                out += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return out
            try:
                if not self._fill():  # TCP EOF: what OpenSSL still holds, then the end
                    with contextlib.suppress(ssl.SSLError):
                        while chunk := self.tls.read(65536):
                            out += chunk
                    return out
            except ConnectionError:
                return out


def parse(reply: bytes) -> RawReply:
    head_, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head_.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return RawReply(status_line.split()[0], int(status_line.split()[1]), headers, body)


@pytest.mark.parametrize("ending", ["fin", "close_notify"])
def test_half_closed_requests_get_their_reply(patient: LiveServer, ending: str) -> None:
    server = patient
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("half")
    cases = [
        (get("/healthz"), 200, "aiohttp"),
        (get("/.well-known/est/cacerts"), 200, "aiohttp"),
        (enroll_request("half", token, csr_body("half", key)), 200, "front"),
    ]
    for request, status, side in cases:
        client = BioClient(server, server.handle.est_port)
        client.send(request)
        getattr(client, ending)()
        started = time.monotonic()
        reply = parse(client.read_to_end())
        assert reply.status == status, (side, reply.status, reply.text)
        assert time.monotonic() - started < SOON, "closed only at the idle deadline"
        if side == "front":
            assert_issued(server, reply, "half", key)
        client.raw.close()


@pytest.mark.parametrize("ending", ["fin", "close_notify"])
def test_half_close_while_the_commit_waits_still_gets_the_certificate(
    server: LiveServer, ending: str
) -> None:
    """The input ends while the enrollment waits for the registry: the certificate is
    recorded and delivered, the reply says it is the last, then the connection closes."""
    device = f"half-busy-{ending}"
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device(device)
    holder = sqlite3.connect(server.layout.registry, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the commit waits (under the 5 s busy deadline)
    try:
        client = BioClient(server, server.handle.est_port)
        client.send(enroll_request(device, token, csr_body(device, key)))
        getattr(client, ending)()
        time.sleep(0.5)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    reply = parse(client.read_to_end())
    assert_issued(server, reply, device, key)
    assert reply.headers["connection"] == "close"
    client.raw.close()


def test_half_closed_plain_http_request_gets_its_reply(server: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", server.handle.http_port), timeout=5) as sock:
        sock.sendall(get("/healthz"))
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply


def test_admin_listener_close_notify_is_quiet(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio's TLS transport has no half-close: the admin listener closes as asyncio does,
    without asyncio's warning about eof_received()."""
    client = BioClient(server, server.handle.admin_port)
    client.send(get("/admin/devices"))
    client.close_notify()
    client.read_to_end()
    client.raw.close()
    time.sleep(0.2)
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]


def test_half_close_with_nothing_to_answer_closes(patient: LiveServer) -> None:
    server = patient
    client = BioClient(server, server.handle.est_port)
    client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # half a head, then the end
    client.fin()
    started = time.monotonic()
    assert client.read_to_end() == b""
    assert time.monotonic() - started < SOON
    client.raw.close()


# --- bounded buffering ---------------------------------------------------------------------------
def test_pipelined_flood_behind_a_pending_commit_is_not_buffered(server: LiveServer) -> None:
    """While an enrollment waits for its commit, the connection is read no further than one
    more request: 32 MiB sent behind it stay with the client (TCP flow control)."""
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("flood")
    holder = sqlite3.connect(server.layout.registry, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the commit waits (well under the 5 s busy deadline)
    flood = b"X" * (32 * 1024 * 1024)
    wire = Wire(server)
    sent = threading.Event()

    def push() -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            wire.sock.sendall(flood)
        sent.set()

    try:
        wire.send(enroll_request("flood", token, csr_body("flood", key)))
        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        time.sleep(1.5)

        async def buffered() -> list[int]:
            return [len(c.buf) for c in server.handle.https.front.connections]  # type: ignore[union-attr]

        sizes = server.call(buffered())
        # One more whole request (head, blank line, body), plus one read of 64 KiB.
        assert sizes and max(sizes) <= MAX_HEAD + 4 + MAX_BODY + 64 * 1024, sizes
        assert not sent.is_set()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    reply = wire.reply()
    assert_issued(server, reply, "flood", key)
    wire.close()
    pusher.join(10)


# --- configuration -------------------------------------------------------------------------------
def test_connections_section_round_trips_and_refuses_bad_values(tmp_path: Path) -> None:
    from enroll_server.home.config import ConfigError, ServerConfig, load_config, render_config

    path = tmp_path / "fleetpki.toml"
    cfg = ServerConfig(
        head_timeout=timedelta(seconds=0.5), idle_timeout=timedelta(minutes=2), max_per_source=7
    )
    path.write_text(render_config(cfg))
    loaded = load_config(path)
    limits = ConnectionLimits.from_config(loaded)
    assert limits == ConnectionLimits(head_timeout=0.5, idle_timeout=120, max_per_source=7)
    text = path.read_text()
    for bad, key in (
        ("max_per_source = 0", "connections.max_per_source"),
        ('head_timeout = "soon"', "connections.head_timeout"),
        ("cap_loopback = 1", "connections.cap_loopback"),
    ):
        name = bad.split(" ")[0]
        lines = [x if not x.startswith(name + " ") else bad for x in text.splitlines()]
        path.write_text("\n".join(lines))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert err.value.key == key


def test_public_tls_path_keeps_the_cap_and_the_head_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the TLS fast path's self-check fails, the EST listener runs on asyncio's TLS
    transport: the per-source cap (counted once the handshake is done) and the head deadline
    still hold there."""
    from enroll_server.est import front

    monkeypatch.setattr(front, "fast_path_unavailable", lambda: "forced off by the test")
    srv = start_live_server(
        tmp_path / "home",
        max_per_source=3,
        cap_loopback=True,
        **short_deadlines(idle_timeout=timedelta(seconds=LONG_IDLE)),
    )
    try:
        port = srv.handle.est_port
        with contextlib.ExitStack() as held:
            est = []
            for _ in range(3):
                conn = held.enter_context(tls_connect(srv, port))
                conn.sendall(get("/healthz"))
                assert conn.recv(65536).startswith(b"HTTP/1.1 200")
                est.append(conn)
            try:
                with tls_connect(srv, port) as fourth:  # the handshake may complete ...
                    fourth.sendall(get("/healthz"))
                    fourth.settimeout(5)
                    assert fourth.recv(65536) == b""  # ... but nothing is served
            except (ssl.SSLError, ConnectionError):
                pass
            est.pop().close()
            deadline = time.monotonic() + 5
            while True:
                with tls_connect(srv, port) as again:
                    again.sendall(get("/healthz"))
                    again.settimeout(5)
                    try:
                        if again.recv(65536).startswith(b"HTTP/1.1 200"):
                            break
                    except (ssl.SSLError, ConnectionError):
                        pass
                assert time.monotonic() < deadline, "the closed connection's place stayed taken"
                time.sleep(0.05)
        with tls_connect(srv, port) as dripping:
            started = time.monotonic()
            dripping.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert drip(dripping, b"X-Slow: " + b"a" * 200, 0.1, started + LONG_IDLE + 3)
            assert HEAD <= time.monotonic() - started < SOON
    finally:
        srv.stop()
