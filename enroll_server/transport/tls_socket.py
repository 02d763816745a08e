"""TLS on non-blocking ssl.SSLSocket: a listener and an asyncio transport for its connections.

asyncio (and uvloop) terminate TLS through memory BIOs: every record is copied between the
socket, a BIO and the protocol, and each connection ends by waiting for the peer's
close_notify under a timer. For a server whose every connection is one short exchange (an
EST enrollment: RFC 7030 devices connect, enroll and leave) that machinery costs about as
much CPU as everything but the handshake itself (BENCHMARKS.md, "Enrollment"). Here OpenSSL
reads and writes the socket directly; the loop only tells us when the descriptor is ready.

`TlsSocketTransport` is a complete asyncio.Transport (flow control, close, abort, extra
info), so any asyncio protocol runs on it: the EST front end, and aiohttp's request
handler for the connections the front end hands over.

Closing sends close_notify (RFC 8446 6.1) after the buffered data, then closes the socket
without waiting for the peer's: every exchange here is delimited by Content-Length, so the
peer's close_notify carries nothing we need, and waiting for it cost a wakeup and a timer
per connection.

The TLS state of a connection is the `_ssl._SSLSocket` that `SSLContext._wrap_socket` binds
to the accepted socket: the very object `ssl.SSLSocket` keeps in its `_sslobj` and
`ssl.SSLObject` wraps around memory BIOs. Building the `ssl.SSLSocket` around it (a socket
subclass: detach and re-attach the descriptor, getpeername, settimeout, a Python-level wrapper
on every read and write) cost more CPU per connection than everything else this module does
(BENCHMARKS.md); `get_extra_info("ssl_object")` still hands out a public `ssl.SSLObject`.

`_ssl._SSLSocket` and `SSLContext._wrap_socket` are CPython internals that any release may
change, so `fast_path_unavailable()` runs a real handshake and exchange through them once at
start-up; if anything differs, the EST listener serves through asyncio's public TLS transport
(`loop.create_server(ssl=...)`) instead, with a warning and `fleetpki_est_tls_fast_path 0`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger("fleetpki.tls")

_READ_SIZE = 64 * 1024
_SEND_CHUNK = 64 * 1024
_ACCEPT_BURST = 64
_ACCEPT_PAUSE = 1.0
LINGER_SECONDS = 2.0
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux only
_NODELAY_INHERITED = sys.platform == "linux"

ProtocolFactory = Callable[[], asyncio.Protocol]


def _ssl_object(tls: Any) -> ssl.SSLObject:
    """The public face of a socket-bound `_ssl._SSLSocket`, for get_extra_info("ssl_object").

    ssl.SSLObject is a thin wrapper whose every method delegates to its `_sslobj`
    (SSLObject._create builds it exactly so, around a BIO-bound one).
    """
    view = ssl.SSLObject.__new__(ssl.SSLObject)
    view._sslobj = tls  # type: ignore[attr-defined]
    return view


def fast_path_unavailable() -> str | None:
    """Why the socket-bound `_ssl._SSLSocket` cannot serve on this Python (None: it can).

    A throwaway certificate, a socketpair, and the calls TlsSocketTransport makes, in its
    order: `SSLContext._wrap_socket(server_side=True)`, do_handshake with a client certificate
    (non-blocking: SSLWantReadError in between), getpeercert/cipher through the public
    SSLObject view, read, write, pending, shutdown. Any change of shape shows up here, at
    start-up, rather than as a broken enrollment.
    """
    try:
        server_ctx, client_ctx = _probe_contexts()
        near, far = socket.socketpair()
        with near, far:
            near.setblocking(False)
            far.setblocking(False)
            tls = server_ctx._wrap_socket(  # type: ignore[attr-defined]
                near, server_side=True, server_hostname=None
            )
            client = client_ctx.wrap_socket(far, do_handshake_on_connect=False)
            done = [False, False]
            for _ in range(50):  # a TLS 1.3 handshake takes 2-3 turns
                for i, step in enumerate((tls.do_handshake, client.do_handshake)):
                    if not done[i]:
                        try:
                            step()
                            done[i] = True
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                            pass
                if all(done):
                    break
            else:
                return "the handshake through SSLContext._wrap_socket did not complete"
            view = _ssl_object(tls)
            if not view.getpeercert(binary_form=True) or not view.cipher():
                return "the socket-bound _SSLSocket shows no peer certificate or cipher"
            client.send(b"ping")
            if tls.read(_READ_SIZE) != b"ping" or tls.pending() != 0:
                return "_SSLSocket.read did not return what the peer sent"
            if tls.write(b"pong") != 4 or client.recv(16) != b"pong":
                return "_SSLSocket.write did not deliver to the peer"
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                tls.shutdown()
            client.close()
    except Exception as exc:  # any change of shape shows up here, whatever it raises
        return f"{type(exc).__name__}: {exc}"
    return None


def _probe_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context that asks for a client certificate and a client that presents one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetpki tls probe")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    # load_cert_chain reads files only; the throwaway key lives a moment in a private folder.
    with tempfile.TemporaryDirectory(prefix="fleetpki-tls-probe-") as folder:
        chain = Path(folder) / "probe.pem"
        chain.touch(0o600)
        chain.write_bytes(key_pem + pem)
        server_ctx.load_cert_chain(chain)
        client_ctx.load_cert_chain(chain)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=pem.decode())
    return server_ctx, client_ctx


class TlsSocketTransport(asyncio.Transport):
    """One server-side TLS connection; the handshake runs first, then `protocol` gets it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        tls: Any,
        protocol: asyncio.Protocol,
        on_done: Callable[[TlsSocketTransport], None] | None = None,
        peername: Any = None,
        on_failure: Callable[[str], object] | None = None,
    ) -> None:
        """`tls`: the `_ssl._SSLSocket` of `sock` (SSLContext._wrap_socket, server side)."""
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._tls = tls
        self._ssl_view: ssl.SSLObject | None = None
        self._fd = sock.fileno()
        self._protocol: asyncio.Protocol = protocol
        self._on_done = on_done
        self._on_failure = on_failure
        self.started = time.monotonic()
        self.handshaken = False
        self._reading = True
        self._closing = False
        self._done = False
        self._writer_added = False
        self._wbuf = bytearray()
        # The exact buffer of a send() that raised SSLWantWriteError: OpenSSL must be called
        # again with the same data (SSL_write's retry rule).
        self._retry: bytes | None = None
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._protocol_paused = False
        self._peername: Any = peername
        loop.add_reader(self._fd, self._read_ready)

    # --- asyncio.BaseTransport ---------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "ssl_object":
            if self._ssl_view is None:
                self._ssl_view = _ssl_object(self._tls)
            return self._ssl_view
        if name == "peername":
            if self._peername is None:
                with contextlib.suppress(OSError):
                    self._peername = self._sock.getpeername()
            return self._peername if self._peername is not None else default
        if name == "sockname":
            with contextlib.suppress(OSError):
                return self._sock.getsockname()
            return default
        if name == "sslcontext":
            return self._tls.context
        if name == "peercert":
            return self._tls.getpeercert() if self.handshaken else None
        if name == "cipher":
            return self._tls.cipher()
        if name == "compression":
            return self._tls.compression()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol), "a streaming protocol is required"
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._wbuf and self._retry is None:
            self._finish(None, graceful=True)

    def abort(self) -> None:
        self._closing = True
        self._finish(None, graceful=False)

    def write_last(self, data: bytes) -> None:
        """write(data), then close(): the reply, close_notify and FIN leave in one segment.

        TCP_CORK holds back partial segments until close() flushes them with the FIN, so the
        peer gets (and the server's kernel pushes through loopback or the NIC) one segment
        instead of three for a short last reply.
        """
        if _TCP_CORK is not None and not self._closing and not self._done:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
        self.write(data)
        self.close()

    # --- asyncio.ReadTransport ---------------------------------------------------------
    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        self._stop_reading()

    def resume_reading(self) -> None:
        if not self._reading and not self._closing and not self._done:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)
            if self.handshaken and self._tls.pending():
                # Decrypted bytes OpenSSL already holds never make the socket readable.
                self._loop.call_soon(self._read_ready)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self._done:
                self._loop.remove_reader(self._fd)

    # --- asyncio.WriteTransport --------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._done or not data:
            return
        if not self.handshaken:
            raise RuntimeError("write before the TLS handshake completed")
        if self._wbuf or self._retry is not None:
            self._wbuf += data
        else:
            self._wbuf += data
            self._flush()
        self._check_high_water()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close short of close_notify (RFC 8446 6.1)

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot write EOF")

    def get_write_buffer_size(self) -> int:
        return len(self._wbuf) + (len(self._retry) if self._retry is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        self._high, self._low = high, low
        self._check_high_water()

    # --- I/O ----------------------------------------------------------------------------
    def _read_ready(self) -> None:
        if self._done:
            return
        try:
            self._read_available()
        except Exception as exc:
            # A protocol callback raised: drop the connection, as asyncio's transports do.
            log.exception("protocol error on a TLS connection; closing it")
            self._finish(exc, graceful=False)

    def _read_available(self) -> None:
        if not self.handshaken:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                # The server flight did not fit the socket buffer: finish when writable.
                self._loop.remove_reader(self._fd)
                self._reading = False
                self._loop.add_writer(self._fd, self._handshake_writable)
                self._writer_added = True
                return
            except (OSError, ssl.SSLError) as exc:
                # Failed handshakes (unknown CA, expired client certificate, a port scan)
                # are the peer's business; OpenSSL has written the alert, which must reach it.
                log.debug("TLS handshake failed: %s", exc)
                self._fail_handshake()
                return
            self.handshaken = True
            self._protocol.connection_made(self)
            if self._closing or self._done:
                return
        while self._reading and not self._closing:
            try:
                data = self._tls.read(_READ_SIZE)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except ssl.SSLWantWriteError:
                # A TLS 1.2 renegotiation (none is offered) that cannot write: give up.
                self._finish(None, graceful=False)
                return
            except ssl.SSLEOFError:
                data = b""  # FIN without close_notify: an end of input like any other
            except ConnectionResetError as exc:
                self._finish(exc, graceful=False)  # nothing can reach the peer any more
                return
            except (OSError, ssl.SSLError) as exc:
                self._finish(exc, graceful=False)
                return
            if not data:
                self._stop_reading()
                keep_open = self._protocol.eof_received()
                if not keep_open:
                    self.close()
                return
            self._protocol.data_received(data)
            if not self._tls.pending():
                return

    def _fail_handshake(self) -> None:
        """Close after a failed handshake so that the peer reads our alert (RFC 8446 6.2).

        A TLS 1.3 client sends its Finished and at once its request; closing with those bytes
        unread makes TCP answer with a reset, which can destroy the alert before the client
        reads it ("certificate expired" would reach the device as a bare reset). So: half-close
        (the alert, then FIN), discard what the peer still sends until it closes or
        LINGER_SECONDS pass, then close.
        """
        if not self._detach():
            return
        if self._on_done is not None:
            self._on_done(self)
        if self._on_failure is not None:
            self._on_failure("handshake")
        raw, fd, loop = self._sock, self._fd, self._loop
        try:
            raw.shutdown(socket.SHUT_WR)
        except OSError:
            raw.close()
            return
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                timer.cancel()
                loop.remove_reader(fd)
                raw.close()

        def drain() -> None:
            try:
                data = raw.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                close()

        timer = loop.call_later(LINGER_SECONDS, close)
        loop.add_reader(fd, drain)

    def _handshake_writable(self) -> None:
        self._loop.remove_writer(self._fd)
        self._writer_added = False
        self._reading = True
        self._loop.add_reader(self._fd, self._read_ready)
        self._read_ready()

    def _flush(self) -> None:
        """Send what is buffered until done or the socket is full."""
        while True:
            chunk = self._retry
            if chunk is None:
                if not self._wbuf:
                    break
                chunk = bytes(self._wbuf[:_SEND_CHUNK])
                del self._wbuf[:_SEND_CHUNK]
            try:
                sent = self._tls.write(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                self._retry = chunk
                if not self._writer_added:
                    self._writer_added = True
                    self._loop.add_writer(self._fd, self._write_ready)
                return
            except (OSError, ssl.SSLError) as exc:
                self._wbuf.clear()
                self._retry = None
                self._finish(exc, graceful=False)
                return
            self._retry = None
            if sent < len(chunk):
                self._wbuf[:0] = chunk[sent:]
        if self._writer_added:
            self._writer_added = False
            self._loop.remove_writer(self._fd)
        self._check_low_water()
        if self._closing:
            self._finish(None, graceful=True)

    def _write_ready(self) -> None:
        self._flush()

    def _check_high_water(self) -> None:
        if not self._protocol_paused and self.get_write_buffer_size() > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _check_low_water(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()

    def _detach(self) -> bool:
        """Stop watching the socket, once; False if that was done already."""
        if self._done:
            return False
        self._done = True
        self._closing = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if self._writer_added:
            self._writer_added = False
            self._loop.remove_writer(self._fd)
        return True

    def _finish(self, exc: Exception | None, *, graceful: bool) -> None:
        if not self._detach():
            return
        if graceful and self.handshaken:
            # close_notify, without waiting for the peer's (see the module docstring).
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                self._tls.shutdown()
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._on_done is not None:
            self._on_done(self)
        if self.handshaken:
            self._loop.call_soon(self._protocol.connection_lost, exc)


class TlsListener:
    """Accepts TCP connections and runs each as a TlsSocketTransport with a new protocol.

    Connections still in their handshake after `handshake_timeout` seconds are dropped.
    """

    def __init__(
        self,
        factory: ProtocolFactory,
        ssl_context: ssl.SSLContext,
        handshake_timeout: float = 30.0,
        on_failure: Callable[[str], object] | None = None,
        admit: Callable[[Any], str | None] | None = None,
        release: Callable[[str], None] | None = None,
    ) -> None:
        """`on_failure(reason)` is told of every handshake that did not complete: "handshake"
        (refused or broken: unknown CA, expired client certificate, not TLS) or "timeout".
        `admit(peername)` is asked at each accept: None refuses the connection (closed at
        once), a string is handed to `release` when the connection ends (a per-source cap)."""
        self.factory = factory
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.on_failure = on_failure
        self.admit = admit
        self.release = release
        self.sockets: list[socket.socket] = []
        self.connections: set[TlsSocketTransport] = set()
        self._sources: dict[TlsSocketTransport, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def listen(self, host: str, port: int, backlog: int = 1024) -> int:
        """Bind every address of `host` on `port` (0: a free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen: set[tuple[int, object]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address[0]) in seen:
                    continue
                seen.add((family, address[0]))
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # Linux hands TCP_NODELAY down to accepted sockets: one setsockopt per
                # listener instead of one per connection (elsewhere _accept sets it).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if hasattr(socket, "TCP_DEFER_ACCEPT"):
                    # Wake for a connection only once its ClientHello has arrived.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
                # Port 0 binds a free port on the first address and that port on the rest.
                sock.bind((address[0], port, *address[2:]))
                sock.listen(backlog)
                sock.setblocking(False)
                port = sock.getsockname()[1]
        except BaseException:
            self.close()
            raise
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        return port

    def close(self) -> None:
        """Stop listening and abort every connection."""
        for sock in self.sockets:
            if self._loop is not None and sock.fileno() >= 0:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets = []
        for transport in list(self.connections):
            transport.abort()

    def _done(self, transport: TlsSocketTransport) -> None:
        self.connections.discard(transport)
        source = self._sources.pop(transport, "")
        if source and self.release is not None:
            self.release(source)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._loop is not None and listener in self.sockets:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def sweep(self) -> None:
        """Drop connections whose handshake has not completed in time."""
        cutoff = time.monotonic() - self.handshake_timeout
        for transport in list(self.connections):
            if not transport.handshaken and transport.started < cutoff:
                transport.abort()
                if self.on_failure is not None:
                    self.on_failure("timeout")

    def _accept(self, listener: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(_ACCEPT_BURST):
            try:
                raw, peername = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # EMFILE and friends: the listener stays readable, so stop watching it for a
                # while (as asyncio does) instead of spinning; serve the connections we have.
                log.warning("accept failed: %s; pausing accepts for %.1f s", exc, _ACCEPT_PAUSE)
                loop.remove_reader(listener.fileno())
                loop.call_later(_ACCEPT_PAUSE, self._resume_accepting, listener)
                return
            source = ""
            if self.admit is not None:
                admitted = self.admit(peername)
                if admitted is None:
                    raw.close()  # over the per-source cap: no TLS, no state
                    continue
                source = admitted
            raw.setblocking(False)
            if not _NODELAY_INHERITED:
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                tls = self.ssl_context._wrap_socket(  # type: ignore[attr-defined]
                    raw, server_side=True, server_hostname=None
                )
            except (OSError, ssl.SSLError):
                raw.close()
                if source and self.release is not None:
                    self.release(source)
                continue
            transport = TlsSocketTransport(
                loop,
                raw,
                tls,
                self.factory(),
                on_done=self._done,
                peername=peername,
                on_failure=self.on_failure,
            )
            self.connections.add(transport)
            if source:
                self._sources[transport] = source
            # With TCP_DEFER_ACCEPT the ClientHello is usually here already.
            transport._read_ready()
