"""The lean EST front end: HTTP/1.1 for the two enrollment POSTs, everything else to aiohttp.

Every enrollment is a fresh TLS connection carrying one POST (RFC 7030 4.2), and at fleet
scale the server spends its time on exactly that. A general framework cost about two thirds
as much CPU per request as the TLS handshake itself (BENCHMARKS.md, "Enrollment"), so the
listener's protocol is this one: it parses the request head, and a plain
`POST /.well-known/est/simpleenroll|simplereenroll` with a Content-Length it serves itself.
Anything else (GET cacerts, the admin API, /metrics, a chunked or Expect: 100-continue POST,
an odd request line, a malformed or doubtful field, bare LF line ends) is handed over as soon
as that is clear, on the same connection and with the bytes read so far, to
the aiohttp application, which answers exactly as it would alone. The rules of who may
enroll and what is accepted live in est/operations.py, shared with the aiohttp routes.

Connections are held to the listener's deadlines and per-source cap (connection_limits.py):
the front end keeps its connections' `Watch` itself and hands it over with the connection. A
head over MAX_HEAD bytes gets 431, a body over the limit 413 without being read (RFC 9110
15.5.14). While an enrollment waits for its commit, at most one more request is buffered
(pipelining); past that the connection is not read until the reply is out (TCP flow control).
After the client ends its input (FIN or TLS close_notify), requests already received are
answered, then the connection is closed (a half-close, RFC 9112 9.6).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from typing import cast

from aiohttp import web
from cryptography import x509

from enroll_server.enrollment.commit_queue import CommitFailed, registry_busy
from enroll_server.enrollment.service import Enrollment, PendingEnrollment
from enroll_server.errors import ServiceError, error_headers, http_status
from enroll_server.est.operations import (
    SIMPLEENROLL,
    SIMPLEREENROLL,
    authorize_simpleenroll,
    authorize_simplereenroll,
    check_content_type,
    csr_of,
    media_type,
    peer_certificate_of,
)
from enroll_server.est.wire import CERTS_ONLY_CONTENT_TYPE, encode_certs_only_der
from enroll_server.registry import RegistryBusy, RegistryError
from enroll_server.transport.connection_limits import READING, Guard, Watch, Watched
from enroll_server.transport.tls_socket import TlsListener, fast_path_unavailable
from enroll_server.web.state import AppState

log = logging.getLogger("fleetpki.http")

EST_PATH = b"/.well-known/est/"
_OPERATIONS = {EST_PATH + SIMPLEENROLL.encode(): SIMPLEENROLL}
_OPERATIONS[EST_PATH + SIMPLEREENROLL.encode()] = SIMPLEREENROLL
MAX_HEAD = 16 * 1024
# After refusing a request whose body is still arriving (413, 431), keep reading and
# discarding for this long (or this many bytes) before closing: closing at once makes the
# peer's TCP answer the rest of its upload with a reset, which can destroy our response
# before the client reads it (RFC 9112 9.6, "lingering close").
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
_REASON = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    409: b"Conflict",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}
_TEXT = b"text/plain; charset=utf-8"
_NOT_RECORDED = "internal error: the registry could not record the certificate"
_CERTS_ONLY_HEADERS = (
    b"Content-Type: " + CERTS_ONLY_CONTENT_TYPE.encode() + b"\r\n"
    # RFC 8951 3: the body is base64 whatever this says; kept for RFC 7030-era clients.
    b"Content-Transfer-Encoding: base64\r\n"
)
# Headers the front end must interpret alone, so a repeat of one is left to aiohttp to judge.
_SINGLE = frozenset({b"content-length", b"content-type", b"authorization", b"connection", b"host"})
# RFC 9110 5.1: a field name is a token; 5.5: a value is VCHAR, obs-text, SP and HTAB, no
# other control character (aiohttp refuses them: 400).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_NAME = re.compile(_TOKEN + rb"\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 3986 3.4: query = *( pchar / "/" / "?" ); anything else in a target (a control
# character, a fragment, '{', a bad %-escape) is aiohttp's to judge.
_QUERY = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*\Z")
# aiohttp's own limits on a request head (a line, a field, the number of fields), passed to
# the request handlers it serves with (http_app._runner): a head past one of them is handed
# over, so that it gets aiohttp's answer (400 or 431) and not a different one here.
MAX_LINE = 8190
MAX_FIELDS = 128


class _HandOver(Exception):
    """Not a request the front end serves: give the connection to aiohttp."""


@dataclass(frozen=True, slots=True)
class Head:
    """A parsed enrollment request head (RFC 9112 3, 5)."""

    operation: str  # SIMPLEENROLL or SIMPLEREENROLL
    path: str
    length: int
    content_type: str | None
    authorization: str | None
    keep_alive: bool
    http10: bool = False  # an HTTP/1.0 request: persistence must be said in the reply


def parse_head(raw: bytes) -> Head:
    """The head of an enrollment POST; raises _HandOver for any other or unusual request.

    Whatever it accepts, aiohttp's parser would read as the same request, ending at the same
    byte (tests/est_front_differential.py checks this, bench/fuzz/fuzz_est_front.py fuzzes
    it): anything it is not sure of is handed over.
    """
    lines = raw.split(b"\r\n")
    operation = request_line_operation(lines[0])
    if operation is None or len(lines) - 1 > MAX_FIELDS:
        raise _HandOver
    _, target, version = lines[0].split(b" ")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # No colon, a name that is no token (whitespace before the colon, RFC 9112 5.1;
        # obs-fold), a control character in the value, an over-long line: aiohttp judges.
        if (
            not sep
            or len(line) > MAX_LINE
            or not _FIELD_NAME.match(name)
            or _BAD_VALUE.search(value)
        ):
            raise _HandOver
        key = name.lower()
        if key in fields and key in _SINGLE:
            raise _HandOver
        fields[key] = value.strip(b" \t")
    # Chunked bodies and 100-continue are rare on this path; aiohttp implements them. An
    # Upgrade (RFC 9110 7.8) makes aiohttp read what follows as another protocol.
    if b"transfer-encoding" in fields or b"expect" in fields or b"upgrade" in fields:
        raise _HandOver
    length = fields.get(b"content-length")
    if length is None or not length.isdigit() or len(length) > 12:
        raise _HandOver
    # RFC 9112 3.2: an HTTP/1.1 request carries exactly one Host (duplicates: _SINGLE).
    if version == b"HTTP/1.1" and b"host" not in fields:
        raise _HandOver
    keep_alive = _keep_alive(version, fields.get(b"connection", b""))
    content_type = fields.get(b"content-type")
    authorization = fields.get(b"authorization")
    return Head(
        operation=operation,
        path=target.decode("ascii"),  # _QUERY: ASCII only
        length=int(length),
        content_type=None if content_type is None else _text(content_type),
        authorization=None if authorization is None else _text(authorization),
        keep_alive=keep_alive,
        http10=version == b"HTTP/1.0",
    )


def request_line_operation(line: bytes) -> str | None:
    """The EST operation of a request line the front end may serve (RFC 9112 3: method SP
    target SP version), None for any other."""
    parts = line.split(b" ")
    if len(parts) != 3 or len(line) > MAX_LINE:
        return None
    method, target, version = parts
    path, _, query = target.partition(b"?")
    operation = _OPERATIONS.get(path)
    if method != b"POST" or version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    if query and not _QUERY.match(query):
        return None
    return operation


def _text(value: bytes) -> str:
    """A field value as aiohttp gives it to a handler: UTF-8, other bytes kept as surrogates
    (obs-text, RFC 9110 5.5), so that both paths judge the same string."""
    return value.decode("utf-8", "surrogateescape")


def _keep_alive(version: bytes, connection: bytes) -> bool:
    """Whether the connection persists after this request (RFC 9112 9.3): the Connection
    field's options (RFC 9110 7.6.1, a comma list of tokens) say close, or keep-alive for
    HTTP/1.0. A value that is not such a list is aiohttp's to judge."""
    options = [o.strip(b" \t").lower() for o in connection.split(b",")] if connection else []
    if any(not _FIELD_NAME.match(o) for o in options if o):
        raise _HandOver
    if b"close" in options:
        return False
    return version == b"HTTP/1.1" or b"keep-alive" in options


class EstFront:
    """One listener: its connections, the aiohttp server to hand over to, their limits."""

    def __init__(self, state: AppState, handover: web.Server, max_body: int, guard: Guard) -> None:
        self.state = state
        self.handover = handover
        self.max_body = max_body
        self.guard = guard
        # Buffered while an enrollment waits for its commit: one more whole request at most.
        self.max_buffer = MAX_HEAD + 4 + max_body
        self.connections: set[EstConnection] = set()
        self._listener: TlsListener | None = None
        # The public path's server (asyncio TLS) when the fast path's self-check failed.
        self._server: asyncio.Server | None = None
        self.fast_path = True
        self._date_second = -1
        self._date = b""

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext) -> int:
        """Listen on host:port (0: any free port); returns the port bound.

        TLS runs on the socket-bound fast path (transport/tls_socket.py) when its start-up
        self-check passes, else on asyncio's public TLS transport: the same TLS, the same
        front end and limits; lost are the fast path's CPU gain (BENCHMARKS.md) and the
        count of failed handshakes, which asyncio does not report.
        """
        why_not = fast_path_unavailable()
        self.fast_path = why_not is None
        self.state.metrics.est_tls_fast_path = self.fast_path
        if why_not is not None:
            log.warning(
                "the EST listener's TLS fast path is unavailable on this Python (%s); "
                "serving through asyncio's standard TLS transport instead",
                why_not,
            )
            self.guard.start()
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: EstConnection(self, admit=True),
                host,
                port,
                ssl=ssl_context,
                ssl_handshake_timeout=self.guard.limits.head_timeout,
                backlog=1024,
                reuse_address=True,
            )
            return int(self._server.sockets[0].getsockname()[1])
        listener = TlsListener(
            lambda: EstConnection(self),
            ssl_context,
            self.guard.limits.head_timeout,
            on_failure=self.state.metrics.tls_failures.inc,
            admit=self.guard.admit,
            release=self.guard.release,
        )
        bound = listener.listen(host, port)
        self._listener = listener
        self.guard.also_sweep.append(listener.sweep)
        self.guard.start()
        return bound

    async def stop(self) -> None:
        """Stop listening and close every connection the front end still holds."""
        self.guard.stop()
        if self._listener is not None:
            # Aborts every connection: those the front end serves and those handed over.
            self._listener.close()
            self._listener = None
        if self._server is not None:
            self._server.close()
            self._server = None
            # Every connection has a Watch, handed over or not (connection_limits.Watched).
            for watch in list(self.guard.watches.values()):
                watch.transport.abort()  # type: ignore[attr-defined]
        for conn in list(self.connections):
            conn.abort()

    def date(self) -> bytes:
        """The Date header value (RFC 9110 6.6.1), formatted once per second."""
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self._date = formatdate(second, usegmt=True).encode()
        return self._date


class EstConnection(asyncio.Protocol):
    """One client connection while the front end serves it."""

    def __init__(self, front: EstFront, *, admit: bool = False) -> None:
        """`admit`: count the connection against its source's cap here (asyncio's TLS
        transport, after the handshake); TlsListener admits at accept, before TLS."""
        self.front = front
        self.admit = admit
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: Head | None = None
        self.body_at = 0
        # Waiting for the registry commit of this connection's certificate.
        self.busy = False
        # The client ended its input: answer what is in, then close.
        self.eof = False
        # Where the connection stands against the listener's deadlines (connection_limits).
        self.watch: Watch | None = None
        # The request being answered is HTTP/1.0 (RFC 9112 9.3: keep-alive is then explicit).
        self.http10 = False
        # Lingering close: input is discarded until EOF, LINGER_SECONDS or LINGER_BYTES.
        self.draining = False
        self.drained = 0
        self._linger_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any transport alike asyncio.Transport (uvloop's TLS transport is no subclass).
        self.transport = cast(asyncio.Transport, transport)
        source = ""
        if self.admit:
            admitted = self.front.guard.admit(transport.get_extra_info("peername"))
            if admitted is None:
                self.transport.abort()  # over the per-source cap
                return
            source = admitted  # released by guard.forget with the Watch
        self.front.connections.add(self)
        self.watch = self.front.guard.watch(transport, source)

    def data_received(self, data: bytes) -> None:
        if self.draining:
            self.drained += len(data)
            if self.drained > LINGER_BYTES:
                self.abort()
            return
        if self.watch is not None:
            self.watch.received(time.monotonic())
        self.buf += data
        if not self.busy:
            self._serve_buffered()
        elif len(self.buf) > self.front.max_buffer and self.transport is not None:
            # Pipelined bytes beyond one whole request while the commit is pending: stop
            # reading (TCP pushes back on the client) until the reply is out (_committed).
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        """End of the client's input (FIN or close_notify): a half-close. A request being
        committed is answered, then the connection closes; with nothing left to answer (no
        request, or only part of one) it closes now. Either way a certificate being
        committed is still recorded."""
        self.eof = True
        return self.busy and self.transport is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        if self.watch is not None:
            self.front.guard.forget(self.watch)
        self.transport = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- requests ------------------------------------------------------------------------
    def _serve_buffered(self) -> None:
        while self.transport is not None and not self.busy:
            head = self.head
            if head is None:
                end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
                if end < 0:
                    if not self._may_be_ours():
                        self._hand_over()
                    elif len(self.buf) > MAX_HEAD:
                        self._text(431, f"request head exceeds {MAX_HEAD} bytes", linger=True)
                    return
                try:
                    head = parse_head(bytes(self.buf[:end]))
                except _HandOver:
                    self._hand_over()
                    return
                if self.watch is not None:
                    self.watch.serving()
                    self.watch.body = READING
                if head.length > self.front.max_body:
                    self._rejected(
                        head,
                        413,
                        f"request body of {head.length} bytes exceeds the "
                        f"{self.front.max_body}-byte limit",
                        linger=True,
                    )
                    return
                self.head = head
                self.body_at = end + 4
            end = self.body_at + head.length
            if len(self.buf) < end:
                return
            if self.watch is not None:
                self.watch.body = None
            body = bytes(self.buf[self.body_at : end])
            del self.buf[:end]
            self.head = None
            self._serve(head, body)

    def _may_be_ours(self) -> bool:
        """Whether an incomplete head may still become a request the front end serves.

        Anything else goes to aiohttp at once: a GET need not wait for its whole head here,
        and a head with bare LF line ends (which never shows CRLFCRLF) is aiohttp's to judge.
        """
        buf = self.buf
        newlines = buf.count(b"\n")
        if newlines != buf.count(b"\r\n"):
            return False
        if newlines == 0:
            return len(buf) <= MAX_LINE and (len(buf) < 5 or buf.startswith(b"POST "))
        return request_line_operation(bytes(buf[: buf.find(b"\r\n")])) is not None

    def _serve(self, head: Head, body: bytes) -> None:
        self.http10 = head.http10
        st = self.front.state
        started = time.perf_counter()
        now = st.clock()
        try:
            if head.operation == SIMPLEENROLL:
                auth = authorize_simpleenroll(
                    st, head.authorization, self._source(), self._peer_certificate, now
                )
            else:
                auth = authorize_simplereenroll(st, self._peer_certificate(), now)
            check_content_type(media_type(head.content_type))
            outcome = st.service.issue(csr_of(body), auth, now)
        except ServiceError as exc:
            self._service_error(head, exc)
            return
        except RegistryBusy as exc:  # a registry read (the token's) met it locked or down
            log.warning("POST %s: %s", head.path, exc)
            self._service_error(head, registry_busy(exc))
            return
        except Exception:
            log.exception("POST %s failed", head.path)
            self._text(500, "internal error", close=True)
            return
        if isinstance(outcome, Enrollment):
            self._issued(head, started, outcome)
            return
        # Nothing reaches the client before its certificate is committed (group commit).
        self.busy = True
        if self.watch is not None:
            self.watch.serving()
        st.commits.submit(outcome.issuance, partial(self._committed, head, started, outcome))

    def _committed(
        self,
        head: Head,
        started: float,
        pending: PendingEnrollment,
        outcome: BaseException | None,
    ) -> None:
        self.busy = False
        if self.transport is None:
            return  # the client left; if it was recorded, a retry (same token, key) gets it
        if isinstance(outcome, CommitFailed) and outcome.busy:
            self._service_error(head, registry_busy(outcome))
        elif outcome is not None and not isinstance(outcome, RegistryError):
            # The transaction failed (logged by the commit queue): nothing was recorded.
            self._rejected(head, 500, _NOT_RECORDED)
        else:
            try:
                enrollment = self.front.state.service.settle(pending, outcome)
            except ServiceError as exc:
                self._service_error(head, exc)
            except RegistryError as exc:
                log.error("POST %s: registry refused the certificate: %s", head.path, exc)
                self._rejected(head, 500, _NOT_RECORDED)
            else:
                self._issued(head, started, enrollment)
        if self.buf:
            self._serve_buffered()  # a pipelined request
        if self.transport is None or self.busy:
            return
        if self.eof:
            self.transport.close()  # half-closed: what was asked is answered
        elif not self.draining and not self.transport.is_reading():
            self.transport.resume_reading()

    # --- replies -------------------------------------------------------------------------
    def _issued(self, head: Head, started: float, enrollment: Enrollment) -> None:
        metrics = self.front.state.metrics
        metrics.enrollments.inc(f"{head.operation}_ok")
        metrics.latency.observe(time.perf_counter() - started)
        self._write(
            200, _CERTS_ONLY_HEADERS, encode_certs_only_der(enrollment.chain_der), head.keep_alive
        )

    def _service_error(self, head: Head, exc: ServiceError) -> None:
        extra = "".join(f"{name}: {value}\r\n" for name, value in error_headers(exc).items())
        self._rejected(head, http_status(exc), exc.reason, extra.encode())

    def _rejected(
        self, head: Head, status: int, reason: str, extra: bytes = b"", linger: bool = False
    ) -> None:
        self.front.state.metrics.enrollments.inc(f"rejected_{status}")
        # Reasons name what was wrong but never carry a secret (tokens are not echoed).
        log.info("POST %s -> %d %s", head.path, status, reason)
        self._text(status, reason, extra, close=not head.keep_alive, linger=linger)

    def _text(
        self,
        status: int,
        reason: str,
        extra: bytes = b"",
        close: bool = False,
        linger: bool = False,
    ) -> None:
        body = (reason + "\n").encode()
        headers = b"Content-Type: " + _TEXT + b"\r\n" + extra
        self._write(status, headers, body, keep_alive=not (close or linger), linger=linger)

    def _write(
        self, status: int, headers: bytes, body: bytes, keep_alive: bool, linger: bool = False
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.eof and not self.buf:
            keep_alive = False  # the client ended its input: this reply is the last
        reply = (
            b"HTTP/1.1 %d %s\r\nServer: fleetpki\r\nDate: %s\r\nContent-Length: %d\r\n%s%s\r\n%s"
            % (
                status,
                _REASON.get(status, b"Error"),
                self.front.date(),
                len(body),
                headers,
                (b"Connection: keep-alive\r\n" if self.http10 else b"")
                if keep_alive
                else b"Connection: close\r\n",
                body,
            )
        )
        if keep_alive or linger:
            transport.write(reply)
        if keep_alive:
            if self.watch is not None:
                self.watch.idle_since = time.monotonic()
        elif linger:
            self.draining = True
            self.drained = 0
            self.buf.clear()
            self.head = None
            if self.watch is not None:
                self.watch.serving()  # the linger timer ends it
            self._linger_timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.abort)
        else:
            self.transport = None
            self.front.connections.discard(self)
            self._write_last(transport, reply)

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _write_last(transport: asyncio.Transport, reply: bytes) -> None:
        write_last = getattr(transport, "write_last", None)  # TlsSocketTransport's
        if write_last is not None:
            write_last(reply)
        else:
            transport.write(reply)
            transport.close()

    def _source(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else "?"

    def _peer_certificate(self) -> x509.Certificate | None:
        if self.transport is None:
            return None
        return peer_certificate_of(self.transport.get_extra_info("ssl_object"))

    def _hand_over(self) -> None:
        """Give the connection, with what was read of it, to aiohttp (RFC 9112 9.3: one
        connection may carry requests the front end serves and requests it does not)."""
        transport = self.transport
        if transport is None:
            return
        self.front.connections.discard(self)
        self.transport = None
        # aiohttp's handler, kept to the same deadlines: the head's clock runs on.
        handler = Watched(self.front.guard, self.front.handover(), self.watch)
        self.watch = None
        if not transport.is_reading():
            transport.resume_reading()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data = bytes(self.buf)
        self.buf.clear()
        if data:
            handler.inner.data_received(data)  # received already: not news for the Watch
        if self.eof:
            handler.eof_received()
