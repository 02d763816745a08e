"""The broker's TLS listener: a strict server context and asyncio's TLS protocol made lean."""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from pathlib import Path

from enroll_server.broker.errors import TlsSetupError
from enroll_server.transport.tls_policy import apply_tls_policy

log = logging.getLogger(__name__)


# -- fact 1: client certificate required, our CA only ----------------------------------------


def server_tls_context(certfile: Path, keyfile: Path, cafile: Path) -> ssl.SSLContext:
    """TLS server context that completes a handshake only with a certificate from our CA.

    amqtt's own `_create_ssl_context` uses CERT_OPTIONAL (a client without a certificate gets
    in) and `create_default_context`, which would also trust the system store were no cafile
    given. Here: CERT_REQUIRED, TLS 1.2 minimum (RFC 9325 section 3.1.1), the trust anchors
    in `cafile` only. OpenSSL checks the client chain for the "SSL client" purpose, so a
    certificate whose EKU lacks clientAuth (a server certificate) fails the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_tls_policy(ctx)  # TLS >= 1.2, AEAD suites only: the EST listener's policy too
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # No TLS 1.3 session tickets (RFC 8446 section 4.6.1): devices reconnect rarely and with
    # full handshakes; two tickets per connection cost CPU on every connect and, stateful or
    # not, memory per session.
    ctx.num_tickets = 0
    for path in (cafile, certfile, keyfile):
        if not path.is_file():
            raise TlsSetupError(path, "no such file")
    try:
        ctx.load_verify_locations(cafile=str(cafile))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsSetupError(cafile, str(exc)) from exc
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsSetupError(certfile, str(exc)) from exc
    return ctx


# -- fact 6: no per-connection read buffer ------------------------------------------------------


_read_buffers = threading.local()


def _shared_read_buffer(size: int) -> memoryview:
    view: memoryview | None = getattr(_read_buffers, "view", None)
    if view is None or len(view) < size:
        view = memoryview(bytearray(size))
        _read_buffers.view = view
    return view


class LeanSSLProtocol(sslproto.SSLProtocol):
    """asyncio's SSLProtocol reading through one buffer shared by all connections of a thread.

    Stock SSLProtocol gives every connection its own 256 KiB read buffer although the buffer
    is only used between `get_buffer()` and the synchronous copy into the TLS engine at the
    start of `buffer_updated()` (asyncio's selector transport calls both back to back, see
    `_read_ready__get_buffer`). One event loop runs on one thread, so one buffer per thread
    serves every connection; an idle connection then holds no read buffer at all.
    `on_handshake_failure` counts failed handshakes (no/foreign/expired certificate, not TLS).
    """

    # Also the size of the buffer SSLProtocol.__init__ allocates before we swap it out, so keep
    # it modest: two full TLS records (RFC 8446 section 5.1: 2^14 bytes of plaintext each).
    max_size = 32 * 1024

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: asyncio.BaseProtocol,
        sslcontext: ssl.SSLContext,
        *,
        handshake_timeout: float,
        shutdown_timeout: float,
        on_handshake_failure: Callable[[BaseException], None],
    ) -> None:
        # typeshed types `waiter` as a Future and the timeouts as int; asyncio accepts None
        # (no waiter: the app protocol learns of the connection) and float seconds.
        super().__init__(
            loop,
            app_protocol,
            sslcontext,
            None,  # type: ignore[arg-type]
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]
            ssl_shutdown_timeout=shutdown_timeout,
        )
        view = _shared_read_buffer(self.max_size)
        self._ssl_buffer_view = view
        self._ssl_buffer = view.obj
        self._on_handshake_failure = on_handshake_failure

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            self._on_handshake_failure(handshake_exc)
        super()._on_handshake_complete(handshake_exc)
        # asyncio keeps the peer certificate decoded into a dict (~2 KB) for
        # get_extra_info("peercert"); the broker reads the DER from the ssl_object instead.
        self._extra.pop("peercert", None)


def lean_tls_unavailable(loop: asyncio.AbstractEventLoop, context: ssl.SSLContext) -> str | None:
    """Why LeanSSLProtocol cannot run on this Python (None: it can).

    LeanSSLProtocol subclasses `asyncio.sslproto.SSLProtocol`, a private class: it swaps the
    read buffer (`_ssl_buffer`, `_ssl_buffer_view`, handed out by `get_buffer`) and hooks
    `_on_handshake_complete`. CPython may change any of these in a release, so the broker
    probes them once at start-up on a throwaway instance and, if one does not hold, serves
    through `loop.create_server(..., ssl=...)`, the public path, instead (same TLS, same
    checks; only the shared read buffer and the handshake-failure count are lost).
    """
    try:
        if not callable(getattr(sslproto.SSLProtocol, "_on_handshake_complete", None)):
            return "asyncio.sslproto.SSLProtocol has no _on_handshake_complete"
        probe = LeanSSLProtocol(
            loop,
            asyncio.Protocol(),
            context,
            handshake_timeout=1.0,
            shutdown_timeout=1.0,
            on_handshake_failure=lambda exc: None,
        )
        shared = _shared_read_buffer(LeanSSLProtocol.max_size)
        view = probe.get_buffer(-1)
        if not isinstance(view, memoryview) or view.obj is not shared.obj:
            return "SSLProtocol.get_buffer no longer hands out _ssl_buffer_view"
        if not isinstance(getattr(probe, "_extra", None), dict):
            return "SSLProtocol keeps no _extra dict"
    except Exception as exc:  # any change of shape shows up here, whatever it raises
        return f"{type(exc).__name__}: {exc}"
    return None


class MqttStreamProtocol(asyncio.StreamReaderProtocol):
    """StreamReaderProtocol that remembers when the peer last sent anything (for keepalive)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        on_connected: Callable[
            [MqttStreamProtocol, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
        ],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.last_rx = time.monotonic()
        super().__init__(reader, lambda r, w: on_connected(self, r, w), loop=loop)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        super().data_received(data)
