"""TlsListener / TlsSocketTransport (enroll_server/transport/tls_socket.py), real TLS on loopback.

The EST listener runs on this transport; the EST and admin API tests exercise it end to end.
These pin down what those do not reach: back-pressure (a reader slower than the writer),
close_notify on close, the handshake timeout, failed handshakes, IPv6, hand-over of the
protocol, and that aiohttp runs unchanged on it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from enroll_server.transport.tls_socket import (
    TlsListener,
    TlsSocketTransport,
    fast_path_unavailable,
)
from fleetpki.identity import DeviceId
from tests.pki_helpers import MemoryCa

BIG = 8 * 1024 * 1024  # far more than loopback socket buffers hold: send() must wait


def _pem(cert: object) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


@pytest.fixture
def tls_pair(ca: MemoryCa, tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for 'localhost' under the test CA."""
    chain = tmp_path / "server.pem"
    chain.write_bytes(_pem(ca.server_cert) + _pem(ca.issuing.cert))
    key = tmp_path / "server.key"
    key.write_bytes(
        ca.server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    root = tmp_path / "root.pem"
    root.write_bytes(_pem(ca.root.cert))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(chain, key)
    client = ssl.create_default_context(cafile=str(root))
    return server, client


class Recorder(asyncio.Protocol):
    """Records what happens to it; answers b"big" with BIG bytes, b"bye" by closing."""

    def __init__(self) -> None:
        self.transport: TlsSocketTransport | None = None
        self.received = bytearray()
        self.lost = asyncio.get_running_loop().create_future()
        self.paused = 0
        self.resumed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TlsSocketTransport)
        self.transport = transport
        self.info = {
            "peername": transport.get_extra_info("peername"),
            "sslcontext": transport.get_extra_info("sslcontext"),
            "version": transport.get_extra_info("ssl_object").version(),
            "missing": transport.get_extra_info("no-such-key", "dflt"),
            # Set on the listener (inherited on Linux) or per connection: never Nagle.
            "nodelay": transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY
            ),
        }

    def data_received(self, data: bytes) -> None:
        self.received += data
        assert self.transport is not None
        if self.received.endswith(b"big\n"):
            self.transport.write(b"x" * BIG + b"END")
            self.transport.close()
        elif self.received.endswith(b"last\n"):
            self.transport.write_last(b"ok\n")
        elif self.received.endswith(b"lastbig\n"):
            self.transport.write_last(b"x" * BIG + b"END")
        elif self.received.endswith(b"bye\n"):
            self.transport.write(b"ok\n")
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def _serve(
    server_ctx: ssl.SSLContext, host: str = "127.0.0.1", timeout: float = 30.0
) -> tuple[TlsListener, list[Recorder], int]:
    protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocols.append(Recorder())
        return protocols[-1]

    listener = TlsListener(factory, server_ctx, handshake_timeout=timeout)
    failures: list[str] = []
    listener.on_failure = failures.append
    listener.failures = failures  # type: ignore[attr-defined]
    port = listener.listen(host, 0)
    return listener, protocols, port


def _client(client_ctx: ssl.SSLContext, port: int, host: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=10)
    return client_ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)


def _read_all(sock: ssl.SSLSocket) -> bytes:
    """Until a clean TLS close: recv returns b"" only on close_notify (ragged EOFs raise)."""
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


async def test_slow_reader_gets_every_byte_then_close_notify(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls_pair
    listener, protocols, port = await _serve(server_ctx)
    try:

        def client() -> bytes:
            with _client(client_ctx, port) as sock:
                sock.sendall(b"big\n")
                import time

                time.sleep(0.5)  # let the server fill the socket buffers and wait
                return _read_all(sock)

        body = await asyncio.to_thread(client)
        assert len(body) == BIG + 3 and body.endswith(b"END") and body.count(b"x") == BIG
        (proto,) = protocols
        assert proto.info["nodelay"] != 0
        assert await asyncio.wait_for(proto.lost, 5) is None
        # The buffer went over the high-water mark while the reader slept, and drained.
        assert proto.paused >= 1 and proto.resumed >= 1
        assert not listener.connections
    finally:
        listener.close()


@pytest.mark.parametrize("what", [b"last", b"lastbig"])
async def test_write_last_delivers_every_byte_then_close_notify(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext], what: bytes
) -> None:
    """write_last corks the socket: what is held back must still reach the peer, with
    close_notify after it, whether it fits one segment or must wait for a slow reader."""
    server_ctx, client_ctx = tls_pair
    listener, protocols, port = await _serve(server_ctx)
    try:

        def client() -> bytes:
            with _client(client_ctx, port) as sock:
                sock.sendall(what + b"\n")
                if what == b"lastbig":
                    import time

                    time.sleep(0.5)  # the server fills the socket buffers and waits
                return _read_all(sock)

        body = await asyncio.to_thread(client)
        if what == b"last":
            assert body == b"ok\n"
        else:
            assert len(body) == BIG + 3 and body.endswith(b"END") and body.count(b"x") == BIG
        (proto,) = protocols
        assert await asyncio.wait_for(proto.lost, 5) is None
        assert not listener.connections
    finally:
        listener.close()


async def test_failed_handshake_leaves_nothing_and_protocol_never_sees_it(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    server_ctx, _ = tls_pair
    listener, protocols, port = await _serve(server_ctx)
    try:
        # A client that does not trust our CA aborts the handshake.
        stranger = ssl.create_default_context()
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(lambda: _client(stranger, port).close())

        # Not TLS at all: the server drops it (an alert then EOF, or a reset).
        def garbage() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
                raw.settimeout(5)
                try:
                    while raw.recv(4096):
                        pass
                except ConnectionResetError:
                    pass

        await asyncio.to_thread(garbage)
        for _ in range(100):
            if not listener.connections:
                break
            await asyncio.sleep(0.02)
        assert not listener.connections
        assert listener.failures == ["handshake", "handshake"]  # type: ignore[attr-defined]
        assert all(p.transport is None for p in protocols)
    finally:
        listener.close()


async def test_silent_client_is_dropped_by_the_handshake_timeout(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, _ = tls_pair
    listener, protocols, port = await _serve(server_ctx, timeout=0.2)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            # TCP_DEFER_ACCEPT: accept() waits for data, so send one byte of a ClientHello.
            raw.sendall(b"\x16")
            for _ in range(100):
                if listener.connections:
                    break
                await asyncio.sleep(0.02)
            assert len(listener.connections) == 1
            await asyncio.sleep(0.3)
            listener.sweep()
            assert not listener.connections
            assert listener.failures == ["timeout"]  # type: ignore[attr-defined]
            raw.settimeout(5)
            assert await asyncio.to_thread(raw.recv, 10) == b""  # the server closed it
            assert not protocols or protocols[0].transport is None
        finally:
            raw.close()
    finally:
        listener.close()


async def test_ipv6_loopback_and_extra_info(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    server_ctx, client_ctx = tls_pair
    try:
        listener, protocols, port = await _serve(server_ctx, host="::1")
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    try:

        def client() -> bytes:
            with _client(client_ctx, port, host="::1") as sock:
                sock.sendall(b"bye\n")
                return _read_all(sock)

        assert await asyncio.to_thread(client) == b"ok\n"
        (proto,) = protocols
        assert proto.info["peername"][0] == "::1"
        assert proto.info["sslcontext"] is server_ctx
        assert proto.info["version"] in ("TLSv1.3", "TLSv1.2")
        assert proto.info["missing"] == "dflt"
        assert proto.info["nodelay"] != 0
    finally:
        listener.close()


async def test_aiohttp_runs_on_the_transport_after_a_hand_over(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A protocol hands its transport and the bytes read so far to aiohttp, as the EST front
    end does with requests it does not serve; aiohttp answers both pipelined requests."""
    server_ctx, client_ctx = tls_pair

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.match_info['who']} secure={request.secure}")

    app = web.Application()
    app.add_routes([web.get("/hello/{who}", hello)])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    aiohttp_server = runner.server

    class HandOver(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            handler = aiohttp_server()
            self.transport.set_protocol(handler)  # type: ignore[attr-defined]
            handler.connection_made(self.transport)
            handler.data_received(data)

    listener = TlsListener(HandOver, server_ctx)
    port = listener.listen("127.0.0.1", 0)
    try:

        def client() -> bytes:
            with _client(client_ctx, port) as sock:
                sock.sendall(
                    b"GET /hello/a HTTP/1.1\r\nHost: x\r\n\r\n"
                    b"GET /hello/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                return _read_all(sock)

        text = (await asyncio.to_thread(client)).decode()
        assert text.count("HTTP/1.1 200 OK") == 2
        assert "hello a secure=True" in text and "hello b secure=True" in text
        assert text.index("hello a") < text.index("hello b")
    finally:
        listener.close()
        await runner.cleanup()


class Exploding(asyncio.Protocol):
    lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        raise ValueError("protocol bug")

    def connection_lost(self, exc: Exception | None) -> None:
        Exploding.lost.append(exc)


async def test_a_raising_protocol_loses_its_connection_and_nothing_else(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    server_ctx, client_ctx = tls_pair
    Exploding.lost = []
    # Its own level: an earlier test may have quieted the "fleetpki" loggers (simulator CLI).
    caplog.set_level(logging.ERROR, logger="fleetpki.tls")
    listener = TlsListener(Exploding, server_ctx)
    port = listener.listen("127.0.0.1", 0)
    try:

        def client() -> bytes:
            with _client(client_ctx, port) as sock:
                sock.sendall(b"boom\n")
                sock.settimeout(5)
                try:
                    return sock.recv(100)
                except (ssl.SSLError, ConnectionError):
                    return b"<reset>"

        assert await asyncio.to_thread(client) in (b"", b"<reset>")
        for _ in range(100):
            if Exploding.lost:
                break
            await asyncio.sleep(0.02)
        assert len(Exploding.lost) == 1 and isinstance(Exploding.lost[0], ValueError)
        assert not listener.connections
        assert "protocol error on a TLS connection" in caplog.text
        # The listener still serves.
        assert await asyncio.to_thread(client) in (b"", b"<reset>")
        for _ in range(100):
            if len(Exploding.lost) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(Exploding.lost) == 2
    finally:
        listener.close()


_EMFILE_CHILD = r"""
import asyncio, resource, ssl, sys
sys.path.insert(0, sys.argv[1])
from enroll_server.transport import tls_socket
from enroll_server.transport.tls_socket import TlsListener

calls = 0

class Counting(TlsListener):
    def _accept(self, listener):
        global calls
        calls += 1
        super()._accept(listener)

class Bye(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(b"hello\n")
        transport.close()

async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    tls_socket._ACCEPT_PAUSE = 0.5
    listener = Counting(Bye, ctx)
    port = listener.listen("127.0.0.1", 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    import os
    listing = os.open("/proc/self/fd", os.O_RDONLY)
    used = {int(n) for n in os.listdir(listing)} - {listing}
    os.close(listing)
    lowest_free = min(set(range(len(used) + 1)) - used)
    # Every new descriptor would get a number >= the limit: accept() fails with EMFILE.
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    print(port, flush=True)
    sys.stdin.readline()  # the parent has connected
    await asyncio.sleep(1.2)
    starved = calls
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await asyncio.sleep(1.5)  # the paused accept resumes and serves the waiting client
    print(starved, calls, flush=True)
    sys.stdin.readline()
    listener.close()

asyncio.run(main())
"""


def test_accept_failures_pause_accepting_instead_of_spinning(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    """Out of file descriptors, the listening socket stays readable: without a pause the
    loop would call accept() thousands of times a second. With it, a few calls, and the
    waiting client is served once descriptors are free again."""
    import subprocess
    import sys

    _, client_ctx = tls_pair
    script = tmp_path / "child.py"
    script.write_text(_EMFILE_CHILD)
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(root),
            str(tmp_path / "server.pem"),
            str(tmp_path / "server.key"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock = client_ctx.wrap_socket(
            raw, server_hostname="localhost", do_handshake_on_connect=False
        )
        sock.settimeout(10)
        child.stdin.write("go\n")
        child.stdin.flush()
        # The ClientHello goes out now; the server can only answer once it can accept.
        sock.do_handshake()
        assert _read_all(sock) == b"hello\n"
        sock.close()
        starved, total = map(int, child.stdout.readline().split())
        assert 1 <= starved <= 5, starved
        assert total <= starved + 5, total
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


# --- the start-up self-check of the private interfaces ------------------------------------------
def test_fast_path_self_check_passes_on_this_python() -> None:
    assert fast_path_unavailable() is None


_REAL_WRAP = ssl.SSLContext._wrap_socket  # type: ignore[attr-defined]


def _gone(self: ssl.SSLContext, *args: object, **kwargs: object) -> object:
    """SSLContext._wrap_socket as a CPython without it would answer the fast path's call (an
    attribute of a C type cannot be deleted, so the test shadows it on the Python subclass).
    ssl.SSLSocket's own use (owner=, the test's clients) still works."""
    if "owner" not in kwargs:
        raise AttributeError("'SSLContext' object has no attribute '_wrap_socket'")
    return _REAL_WRAP(self, *args, **kwargs)


def test_self_check_names_a_missing_wrap_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssl.SSLContext, "_wrap_socket", _gone)
    why = fast_path_unavailable()
    assert why is not None and "_wrap_socket" in why


def test_self_check_notices_an_ssl_socket_that_reads_differently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A CPython whose socket-bound _SSLSocket takes other arguments or hands back another
    # type: the transport's reads would break on every connection.
    real = ssl.SSLContext._wrap_socket  # type: ignore[attr-defined]

    class Changed:
        def __init__(self, inner: object) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self._inner, name)

        def read(self, n: int) -> str:  # str, not bytes
            return self._inner.read(n).decode()  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(
        ssl.SSLContext, "_wrap_socket", lambda self, *a, **k: Changed(real(self, *a, **k))
    )
    assert fast_path_unavailable() == "_SSLSocket.read did not return what the peer sent"


def test_server_warns_and_enrolls_on_the_public_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With the private interface gone, `serve` warns, reports 0 and enrolls devices all the
    same (the whole EST front-end suite also runs this way: test_est_front.PUBLIC_TLS)."""
    from enroll_server.pki.keys import KeyType, generate_key
    from tests.est_client import request
    from tests.integration.test_est import EST, b64
    from tests.live_server import start_live_server
    from tests.pki_helpers import csr_der, make_csr

    monkeypatch.setattr(ssl.SSLContext, "_wrap_socket", _gone)
    caplog.set_level(logging.WARNING, "fleetpki.http")
    srv = start_live_server(tmp_path / "home")
    try:
        assert "fleetpki_est_tls_fast_path 0" in srv.metrics()
        assert any("TLS fast path is unavailable" in r.getMessage() for r in caplog.records)
        token = srv.mint_device("dev-public-1")
        body = b64(csr_der(make_csr(generate_key(KeyType.EC_P256), "dev-public-1")))
        reply = request(
            srv.est_url + EST + "/simpleenroll",
            srv.client_ssl(),
            "POST",
            body,
            {
                "Content-Type": "application/pkcs10",
                "Content-Transfer-Encoding": "base64",
                "Authorization": "Basic "
                + base64.b64encode(f"dev-public-1:{token}".encode()).decode(),
            },
        )
        assert reply.status == 200, reply.text
        assert len(srv.registry.certificates_of(DeviceId("dev-public-1"))) == 1
    finally:
        srv.stop()
