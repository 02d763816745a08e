"""The lean EST front end (est/front.py) on the wire: raw HTTP/1.1 over real TLS.

The front end serves a plain `POST /.well-known/est/simpleenroll|simplereenroll` with a
Content-Length itself (its replies say `Server: fleetpki`) and hands every other request over
on the same connection to aiohttp (whose replies say `Server: Python/... aiohttp/...`), so
these tests speak HTTP byte by byte and check which side answered, what it answered, and what
the registry recorded. The protocol tests run on stock asyncio and on uvloop (what
`fleetpki serve` uses): the listener's TLS transport, the hand-over (which swaps the protocol
of a live transport), the idle sweep and the lingering close all run on the loop's reader
callbacks and timers. The last tests pin down defects of front.py found here (now fixed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from enroll_server.est import front
from enroll_server.est.front import MAX_HEAD, MAX_LINE, Head, _HandOver, parse_head
from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import KeyType, PrivateKey, generate_key
from enroll_server.registry import CertStatus, Issuance, Registry, RegistryError
from enroll_server.web.app import MAX_BODY
from fleetpki.identity import DeviceId
from tests.integration.test_est import EST, b64, leaf, snapshot
from tests.live_server import LiveServer, start_live_server
from tests.pki_helpers import csr_der, make_csr

SIMPLEENROLL = f"{EST}/simpleenroll".encode()
LOOPS = ["asyncio", "uvloop"]
# The same front end on asyncio's standard TLS transport: the path `fleetpki serve` takes when
# the fast path's start-up self-check fails (transport/tls_socket.fast_path_unavailable).
PUBLIC_TLS = "asyncio-public-tls"


# --- a raw HTTP/1.1 client over TLS ------------------------------------------------------------
@dataclass
class RawReply:
    version: str
    status: int
    headers: dict[str, str]  # lowercase names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    @property
    def by_front(self) -> bool:
        """Served by the lean front end (aiohttp names itself in Server)."""
        return self.headers.get("server") == "fleetpki"

    @property
    def by_aiohttp(self) -> bool:
        return "aiohttp" in self.headers.get("server", "")

    @property
    def certificate(self) -> x509.Certificate:
        return leaf(decode_certs_only(self.body))


class Wire:
    """One TLS connection to the EST listener; requests written and replies read by hand."""

    def __init__(self, server: LiveServer, timeout: float = 10.0) -> None:
        self.timeout = timeout
        raw = socket.create_connection(("127.0.0.1", server.handle.est_port), timeout=timeout)
        self.sock = server.client_ssl().wrap_socket(raw, server_hostname="localhost")
        self.sock.settimeout(timeout)
        self.buf = b""

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"server closed the connection; unparsed: {self.buf[:200]!r}")
        self.buf += data

    def reply(self) -> RawReply:
        """The next reply: status line, headers, and a Content-Length body (or up to EOF)."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
        status_line, *lines = head.split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated header {name}: {head}"
            headers[name.lower()] = value.strip()
        code = int(status)
        if 100 <= code < 200:
            return RawReply(version, code, headers, b"")
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buf) < length:
                self._fill()
            body, self.buf = self.buf[:length], self.buf[length:]
        else:  # not expected from either side; read to the end
            assert "chunked" not in headers.get("transfer-encoding", ""), head
            try:
                while True:
                    self._fill()
            except EOFError:
                pass
            body, self.buf = self.buf, b""
        return RawReply(version, code, headers, body)

    def closed_by_server(self, within: float = 5.0) -> bool:
        """True once the server closes (EOF or reset) within `within` seconds; False if not."""
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True
        finally:
            self.sock.settimeout(self.timeout)
        assert not data and not self.buf, f"unexpected bytes after the reply: {data!r}"
        return True


def authorization(device: str, token: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"{device}:{token}".encode()) + b"\r\n"


def csr_body(device: str, key: PrivateKey | None = None) -> bytes:
    return b64(csr_der(make_csr(key or generate_key(KeyType.EC_P256), device)))


def head(
    device: str | None = None,
    token: str | None = None,
    *,
    length: int | None = None,
    version: bytes = b"HTTP/1.1",
    content_type: bytes | None = b"application/pkcs10",
    extra: Sequence[bytes] = (),
    path: bytes = SIMPLEENROLL,
) -> bytes:
    """A POST head up to and including the blank line; `extra` are whole header lines."""
    out = b"POST " + path + b" " + version + b"\r\nHost: localhost\r\n"
    if device is not None and token is not None:
        out += authorization(device, token)
    if content_type is not None:
        out += b"Content-Type: " + content_type + b"\r\n"
    if length is not None:
        out += b"Content-Length: %d\r\n" % length
    return out + b"".join(line + b"\r\n" for line in extra) + b"\r\n"


def enroll_request(
    device: str,
    token: str,
    body: bytes,
    *,
    version: bytes = b"HTTP/1.1",
    content_type: bytes | None = b"application/pkcs10",
    extra: Sequence[bytes] = (),
) -> bytes:
    """A plain Content-Length simpleenroll: the lean path."""
    return (
        head(
            device,
            token,
            length=len(body),
            version=version,
            content_type=content_type,
            extra=extra,
        )
        + body
    )


def get(path: str, *extra: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
        + b"".join(line + b"\r\n" for line in extra)
        + b"\r\n"
    )


def assert_issued(server: LiveServer, reply: RawReply, device: str, key: PrivateKey) -> int:
    """A 200 certs-only reply for `device` and `key`, recorded ACTIVE; returns its serial."""
    assert reply.status == 200, (reply.status, reply.text)
    assert reply.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    cert = reply.certificate
    assert cert.subject.rfc4514_string() == f"CN={device}"
    assert cert.public_key() == key.public_key()
    rec = server.registry.get_certificate(cert.serial_number)
    assert rec is not None and rec.status is CertStatus.ACTIVE and rec.device_id == DeviceId(device)
    return cert.serial_number


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} missing from /metrics"
    return float(match.group(1))


def start_server(home: Path, loop: str, **config: Any) -> LiveServer:
    """start_live_server on stock asyncio or on uvloop (as `fleetpki serve` runs)."""
    if loop == "asyncio":
        return start_live_server(home, **config)
    uvloop = pytest.importorskip("uvloop")
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return start_live_server(home, **config)  # its loop comes from the policy, now
    finally:
        asyncio.set_event_loop_policy(previous)


@pytest.fixture(params=[*LOOPS, PUBLIC_TLS])
def server(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LiveServer]:
    loop = request.param
    if loop == PUBLIC_TLS:
        monkeypatch.setattr(front, "fast_path_unavailable", lambda: "forced off by the test")
        loop = "asyncio"
    srv = start_server(tmp_path / "home", loop)
    assert metric(srv.metrics(), "fleetpki_est_tls_fast_path") == (request.param != PUBLIC_TLS)
    try:
        yield srv
    finally:
        srv.stop()


# --- parse_head ----------------------------------------------------------------------------------
def test_parse_head_fields() -> None:
    parsed = parse_head(
        b"POST /.well-known/est/simpleenroll?x=1 HTTP/1.1\r\n"
        b"Host: est.example\r\n"
        b"content-TYPE:\tapplication/pkcs10; charset=x \r\n"
        b"Authorization: Basic ZGV2OnRvaw==\r\n"
        b"X-Dup: 1\r\n"
        b"X-Dup: 2\r\n"
        b"Content-Length:  123 "
    )
    assert parsed == Head(
        operation="simpleenroll",
        path="/.well-known/est/simpleenroll?x=1",
        length=123,
        content_type="application/pkcs10; charset=x",
        authorization="Basic ZGV2OnRvaw==",
        keep_alive=True,
    )
    re_head = parse_head(
        b"POST /.well-known/est/simplereenroll HTTP/1.1\r\nHost: x\r\nContent-Length: 0"
    )
    assert re_head.operation == "simplereenroll" and re_head.length == 0
    assert re_head.content_type is None and re_head.authorization is None


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"HTTP/1.1", None, True),
        (b"HTTP/1.1", b"close", False),
        (b"HTTP/1.1", b"Keep-Alive, Close", False),
        (b"HTTP/1.0", None, False),
        (b"HTTP/1.0", b"Keep-Alive", True),
    ],
)
def test_parse_head_keep_alive(version: bytes, connection: bytes | None, keep_alive: bool) -> None:
    raw = b"POST /.well-known/est/simpleenroll " + version + b"\r\nHost: x\r\nContent-Length: 5"
    if connection is not None:
        raw += b"\r\nConnection: " + connection
    assert parse_head(raw).keep_alive is keep_alive


CL = b"\r\nContent-Length: 5"
_HANDED_OVER = {
    "GET": b"GET /.well-known/est/simpleenroll HTTP/1.1" + CL,
    "lowercase method": b"post /.well-known/est/simpleenroll HTTP/1.1" + CL,
    "other EST path": b"POST /.well-known/est/cacerts HTTP/1.1" + CL,
    "path prefix": b"POST /.well-known/est/simpleenrollx HTTP/1.1" + CL,
    "admin API": b"POST /admin/devices HTTP/1.1" + CL,
    "absolute form": b"POST https://localhost/.well-known/est/simpleenroll HTTP/1.1" + CL,
    "HTTP/2.0": b"POST /.well-known/est/simpleenroll HTTP/2.0" + CL,
    "HTTP/0.9 style": b"POST /.well-known/est/simpleenroll" + CL,
    "double space": b"POST  /.well-known/est/simpleenroll HTTP/1.1" + CL,
    "obs-fold": b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + b"\r\nX-A: 1\r\n  folded",
    "space before colon": b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nContent-Length : 5",
    "line without colon": b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + b"\r\nnocolon",
    "empty field name": b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + b"\r\n: x",
    "duplicate Content-Length": b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + CL,
    "duplicate Content-Length, other case": (
        b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + b"\r\ncontent-length: 5"
    ),
    "duplicate Authorization": (
        b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + b"\r\nAuthorization: a\r\n"
        b"Authorization: b"
    ),
    "duplicate Content-Type": (
        b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + b"\r\nContent-Type: a\r\n"
        b"Content-Type: b"
    ),
    "Transfer-Encoding": (
        b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nTransfer-Encoding: chunked"
    ),
    "Transfer-Encoding and Content-Length": (
        b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + b"\r\nTransfer-Encoding: chunked"
    ),
    "Expect": b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL + b"\r\nExpect: 100-continue",
    "missing Content-Length": b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x",
    "signed Content-Length": b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nContent-Length: +5",
    "negative Content-Length": b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nContent-Length: -1",
    "list Content-Length": b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nContent-Length: 5, 5",
    "huge Content-Length": (
        b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nContent-Length: 1234567890123"
    ),
}


def _with_host(raw: bytes) -> bytes:
    """The case with a Host field after its request line, so that a missing Host (itself a
    reason to hand over, RFC 9112 3.2) is not what makes it go to aiohttp."""
    line, sep, rest = raw.partition(b"\r\n")
    return line + b"\r\nHost: x" + sep + rest


HANDED_OVER = {name: _with_host(raw) for name, raw in _HANDED_OVER.items()}
HANDED_OVER["HTTP/1.1 without Host"] = b"POST /.well-known/est/simpleenroll HTTP/1.1" + CL


@pytest.mark.parametrize("case", sorted(HANDED_OVER))
def test_parse_head_hands_over(case: str) -> None:
    with pytest.raises(_HandOver):
        parse_head(HANDED_OVER[case])


# --- keep-alive and hand-over ----------------------------------------------------------------
def test_keep_alive_front_front_then_handover(server: LiveServer) -> None:
    """Two enrollments served by the front end, then a GET it hands over: one socket."""
    key_a, key_b = generate_key(KeyType.EC_P256), generate_key(KeyType.EC_P256)
    tok_a, tok_b = server.mint_device("ka-a"), server.mint_device("ka-b")
    with Wire(server) as wire:
        wire.send(enroll_request("ka-a", tok_a, csr_body("ka-a", key_a)))
        first = wire.reply()
        assert first.by_front and "connection" not in first.headers
        assert_issued(server, first, "ka-a", key_a)

        wire.send(enroll_request("ka-b", tok_b, csr_body("ka-b", key_b)))
        second = wire.reply()
        assert second.by_front
        assert_issued(server, second, "ka-b", key_b)

        wire.send(get("/healthz"))
        health = wire.reply()
        assert health.status == 200 and health.by_aiohttp, health
        assert health.body == b'{"status": "ok"}'
        # The connection now belongs to aiohttp, which keeps it alive too.
        wire.send(get(f"{EST}/cacerts"))
        cacerts = wire.reply()
        assert cacerts.status == 200 and cacerts.by_aiohttp
        assert len(decode_certs_only(cacerts.body)) == 2


def test_keep_alive_after_handover_stays_with_aiohttp(server: LiveServer) -> None:
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("ka-c")
    with Wire(server) as wire:
        wire.send(get(f"{EST}/cacerts"))
        cacerts = wire.reply()
        assert cacerts.status == 200 and cacerts.by_aiohttp
        wire.send(enroll_request("ka-c", token, csr_body("ka-c", key)))
        enrolled = wire.reply()
        # A plain POST, but on a connection aiohttp already owns: its route answers alike.
        assert enrolled.by_aiohttp
        assert_issued(server, enrolled, "ka-c", key)


def test_pipelined_enrollments_answer_in_order(server: LiveServer) -> None:
    keys = [generate_key(KeyType.EC_P256) for _ in range(2)]
    devices = ["pipe-1", "pipe-2"]
    requests = [
        enroll_request(dev, server.mint_device(dev), csr_body(dev, key))
        for dev, key in zip(devices, keys, strict=True)
    ]
    with Wire(server) as wire:
        # Both enrollments and a GET for aiohttp in one write: each waits for the commit of
        # the one before, then the rest of the buffer is handed over.
        wire.send(b"".join(requests) + get("/healthz"))
        replies = [wire.reply() for _ in range(3)]
    serials = [
        assert_issued(server, reply, dev, key)
        for reply, dev, key in zip(replies[:2], devices, keys, strict=True)
    ]
    assert all(r.by_front for r in replies[:2])
    assert replies[2].status == 200 and replies[2].by_aiohttp
    assert replies[2].body == b'{"status": "ok"}'
    assert len(set(serials)) == 2
    for dev in devices:
        assert snapshot(server, dev) == (1, "active", ["active"])


# --- what the front end hands over ----------------------------------------------------------
def test_chunked_enrollment_is_handed_over(server: LiveServer) -> None:
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("chunky")
    body = csr_body("chunky", key)
    chunks = [body[:100], body[100:]]
    with Wire(server) as wire:
        wire.send(
            head("chunky", token, extra=[b"Transfer-Encoding: chunked"])
            + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
            + b"0\r\n\r\n"
        )
        reply = wire.reply()
    assert reply.by_aiohttp
    assert_issued(server, reply, "chunky", key)


@pytest.mark.parametrize("chunked", [False, True], ids=["front", "aiohttp"])
def test_registry_locked_past_the_deadline_is_503_on_both_paths(
    server: LiveServer, chunked: bool
) -> None:
    """Both HTTP layers turn a commit that met the registry locked for too long into 503 +
    Retry-After (the agent retries 5xx), with nothing issued and the token still good."""
    device = f"busy-{'chunked' if chunked else 'plain'}"
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device(device)
    body = csr_body(device, key)
    commits = server.handle.state.commits
    deadline, commits.busy_deadline = commits.busy_deadline, 0.2
    holder = sqlite3.connect(server.layout.registry, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with Wire(server) as wire:
            if chunked:
                wire.send(
                    head(device, token, extra=[b"Transfer-Encoding: chunked"])
                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                )
            else:
                wire.send(head(device, token, length=len(body)) + body)
            reply = wire.reply()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        commits.busy_deadline = deadline
    assert (reply.by_aiohttp, reply.by_front) == (chunked, not chunked)
    assert reply.status == 503 and reply.headers["retry-after"] == "5"
    assert b"registry is locked" in reply.body
    assert snapshot(server, device) == (0, "provisioned", [])
    with Wire(server) as wire:
        wire.send(head(device, token, length=len(body)) + body)
        assert_issued(server, wire.reply(), device, key)


def test_expect_100_continue_is_handed_over(server: LiveServer) -> None:
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("expecting")
    body = csr_body("expecting", key)
    with Wire(server) as wire:
        wire.send(head("expecting", token, length=len(body), extra=[b"Expect: 100-continue"]))
        interim = wire.reply()
        assert interim.status == 100 and interim.version == "HTTP/1.1"
        assert snapshot(server, "expecting") == (0, "provisioned", [])
        wire.send(body)
        reply = wire.reply()
    assert reply.by_aiohttp
    assert_issued(server, reply, "expecting", key)


# --- limits -------------------------------------------------------------------------------------
def test_content_length_over_limit_is_413_before_the_body(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front, "LINGER_SECONDS", 0.3)  # read when the 413 is written
    token = server.mint_device("too-big")
    with Wire(server, timeout=5) as wire:
        wire.send(head("too-big", token, length=MAX_BODY + 1))  # the head alone
        reply = wire.reply()
        assert reply.status == 413 and reply.by_front
        assert reply.headers["connection"] == "close"
        assert (
            reply.text
            == f"request body of {MAX_BODY + 1} bytes exceeds the {MAX_BODY}-byte limit\n"
        )
        # The server lingers (RFC 9112 9.6) for LINGER_SECONDS, then closes.
        assert wire.closed_by_server(within=3)
    assert snapshot(server, "too-big") == (0, "provisioned", [])
    key = generate_key(KeyType.EC_P256)
    with Wire(server) as wire:  # the token was not burned
        wire.send(enroll_request("too-big", token, csr_body("too-big", key)))
        assert_issued(server, wire.reply(), "too-big", key)


def test_413_lingers_while_the_body_still_arrives(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9112 9.6: the refused upload is read and dropped, so the reply is not reset."""
    monkeypatch.setattr(front, "LINGER_SECONDS", 0.5)
    token = server.mint_device("uploader")
    body = b"A" * (4 * MAX_BODY)
    with Wire(server, timeout=5) as wire:
        wire.send(head("uploader", token, length=len(body)) + body)  # does not raise
        reply = wire.reply()
        assert reply.status == 413 and reply.by_front
        assert reply.headers["connection"] == "close"
        assert wire.closed_by_server(within=3)
    assert snapshot(server, "uploader") == (0, "provisioned", [])


def test_linger_ends_after_linger_bytes(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front, "LINGER_SECONDS", 30.0)
    monkeypatch.setattr(front, "LINGER_BYTES", 2 * MAX_BODY)
    token = server.mint_device("flooder")
    with Wire(server, timeout=5) as wire:
        wire.send(head("flooder", token, length=MAX_BODY + 1))
        assert wire.reply().status == 413
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the abort may reset the rest of the upload
            wire.send(b"A" * (4 * MAX_BODY))
        assert wire.closed_by_server(within=3)
        assert time.monotonic() - started < 5  # not the 30 s linger


def test_body_of_exactly_the_limit_is_read(server: LiveServer) -> None:
    token = server.mint_device("at-limit")
    with Wire(server) as wire:
        wire.send(enroll_request("at-limit", token, b"*" * MAX_BODY))
        reply = wire.reply()
        assert reply.status == 400 and reply.by_front, reply
        assert "not valid base64" in reply.text
        # An error reply keeps the connection: the next request is served on it.
        key = generate_key(KeyType.EC_P256)
        wire.send(enroll_request("at-limit", token, csr_body("at-limit", key)))
        assert_issued(server, wire.reply(), "at-limit", key)


def test_head_over_max_head_is_431(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "LINGER_SECONDS", 0.3)
    server.mint_device("big-head")
    with Wire(server, timeout=5) as wire:
        # No blank line yet: the front end cannot know where the head ends.
        start = b"POST " + SIMPLEENROLL + b" HTTP/1.1\r\nX-Pad: "
        wire.send(start + b"a" * (MAX_HEAD + 1 - len(start)))
        reply = wire.reply()
        assert reply.status == 431 and reply.by_front
        assert reply.headers["connection"] == "close"
        assert reply.text == f"request head exceeds {MAX_HEAD} bytes\n"
        assert wire.closed_by_server(within=3)
    assert snapshot(server, "big-head") == (0, "provisioned", [])


def test_head_of_exactly_max_head_is_served(server: LiveServer) -> None:
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("full-head")
    body = csr_body("full-head", key)
    names = [b"X-Pad-%d: " % i for i in range(4)]
    plain = head("full-head", token, length=len(body), extra=names)
    # Pad the X-Pad fields so that the head without its final CRLFCRLF is MAX_HEAD bytes,
    # each line within aiohttp's MAX_LINE (a longer one is aiohttp's to refuse).
    pad = MAX_HEAD + 4 - len(plain)
    sizes = [pad // 4] * 3 + [pad - 3 * (pad // 4)]
    assert max(sizes) + len(names[0]) <= MAX_LINE
    raw = head(
        "full-head",
        token,
        length=len(body),
        extra=[name + b"p" * size for name, size in zip(names, sizes, strict=True)],
    )
    assert raw.index(b"\r\n\r\n") == MAX_HEAD
    with Wire(server) as wire:
        wire.send(raw + body)
        reply = wire.reply()
    assert reply.by_front
    assert_issued(server, reply, "full-head", key)


# --- connection management ----------------------------------------------------------------------
def test_http10_without_keep_alive_is_closed(server: LiveServer) -> None:
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("old-http")
    with Wire(server, timeout=5) as wire:
        wire.send(enroll_request("old-http", token, csr_body("old-http", key), version=b"HTTP/1.0"))
        reply = wire.reply()
        assert reply.by_front and reply.headers["connection"] == "close"
        assert_issued(server, reply, "old-http", key)
        assert wire.closed_by_server()


def test_http10_keep_alive_keeps_the_connection(server: LiveServer) -> None:
    keys = [generate_key(KeyType.EC_P256) for _ in range(2)]
    with Wire(server) as wire:
        for i, key in enumerate(keys):
            dev = f"old-ka-{i}"
            wire.send(
                enroll_request(
                    dev,
                    server.mint_device(dev),
                    csr_body(dev, key),
                    version=b"HTTP/1.0",
                    extra=[b"Connection: keep-alive"],
                )
            )
            reply = wire.reply()
            # RFC 9112 9.3 / RFC 7230 A.1.2: an HTTP/1.0 peer keeps the connection only if
            # the reply says keep-alive.
            assert reply.by_front and reply.headers["connection"] == "keep-alive"
            assert_issued(server, reply, dev, key)


def test_connection_close_is_honoured(server: LiveServer) -> None:
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("closer")
    with Wire(server, timeout=5) as wire:
        wire.send(
            enroll_request("closer", token, csr_body("closer", key), extra=[b"Connection: close"])
        )
        reply = wire.reply()
        assert reply.by_front and reply.headers["connection"] == "close"
        assert_issued(server, reply, "closer", key)
        assert wire.closed_by_server()
    with Wire(server, timeout=5) as wire:  # an error reply closes as well
        wire.send(
            enroll_request("closer", "wrong", csr_body("closer"), extra=[b"Connection: close"])
        )
        reply = wire.reply()
        assert reply.status == 401 and reply.by_front and reply.headers["connection"] == "close"
        assert wire.closed_by_server()


# --- error replies ------------------------------------------------------------------------------
def assert_text_reply(reply: RawReply, status: int) -> None:
    assert reply.status == status and reply.by_front, (reply.status, reply.text)
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert reply.text.endswith("\n") and reply.text.count("\n") == 1 and len(reply.text) > 1
    date = reply.headers["date"]
    assert date.endswith(" GMT")
    assert abs(parsedate_to_datetime(date) - datetime.now(UTC)) < timedelta(minutes=1)


def test_front_error_replies(live_server: LiveServer) -> None:
    token = live_server.mint_device("err-dev")
    body = csr_body("err-dev")
    with Wire(live_server) as wire:  # every error below leaves the connection open
        wire.send(head(length=len(body)) + body)
        reply = wire.reply()
        assert_text_reply(reply, 401)
        assert reply.headers["www-authenticate"].startswith("Basic ")
        assert "HTTP Basic" in reply.text

        wire.send(enroll_request("err-dev", token, body, content_type=b"application/json"))
        reply = wire.reply()
        assert_text_reply(reply, 415)
        assert "application/json" in reply.text and "application/pkcs10" in reply.text
        assert "www-authenticate" not in reply.headers

        wire.send(head("err-dev", token, path=f"{EST}/simplereenroll".encode(), length=0))
        reply = wire.reply()
        assert_text_reply(reply, 403)
        assert "client authentication" in reply.text

        # Wrong tokens: 401 each, until the throttle (5 per device a minute) answers 429.
        for _ in range(5):
            wire.send(enroll_request("err-dev", "guess", body))
            reply = wire.reply()
            assert_text_reply(reply, 401)
            assert reply.text == "unknown device or wrong enrollment token\n"
            assert reply.headers["www-authenticate"].startswith("Basic ")
        wire.send(enroll_request("err-dev", "guess", body))
        reply = wire.reply()
        assert_text_reply(reply, 429)
        assert int(reply.headers["retry-after"]) >= 1
    assert snapshot(live_server, "err-dev") == (0, "provisioned", [])
    # The throttle holds the guesser back, never the device: its own token enrolls.
    with Wire(live_server) as wire:
        wire.send(enroll_request("err-dev", token, body))
        assert wire.reply().status == 200
    assert snapshot(live_server, "err-dev")[1] == "active"


@pytest.mark.parametrize(
    ("status", "content_type", "credentials"),
    [(401, b"application/pkcs10", False), (415, b"application/json", True)],
)
def test_front_and_aiohttp_errors_agree(
    live_server: LiveServer, status: int, content_type: bytes, credentials: bool
) -> None:
    """The same refused request, lean (Content-Length) and handed over (chunked)."""
    token = live_server.mint_device("twin")
    body = csr_body("twin")
    user = ("twin", token) if credentials else (None, None)
    replies = []
    for framing in ("lean", "chunked"):
        with Wire(live_server) as wire:
            if framing == "lean":
                wire.send(head(*user, length=len(body), content_type=content_type) + body)
            else:
                wire.send(
                    head(*user, content_type=content_type, extra=[b"Transfer-Encoding: chunked"])
                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                )
            replies.append(wire.reply())
    lean, handed = replies
    assert lean.by_front and handed.by_aiohttp
    assert lean.status == handed.status == status
    assert lean.text == handed.text
    assert lean.headers["content-type"] == handed.headers["content-type"]
    assert lean.headers.get("www-authenticate") == handed.headers.get("www-authenticate")
    assert snapshot(live_server, "twin") == (0, "provisioned", [])


# --- a client that leaves -----------------------------------------------------------------------
def test_client_gone_before_reply_then_retry_gets_same_certificate(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    key = generate_key(KeyType.EC_P256)
    token = server.mint_device("leaver")
    body = csr_body("leaver", key)
    wire = Wire(server)
    wire.send(enroll_request("leaver", token, body))
    wire.close()  # before any reply: the request is in flight, the commit ahead
    deadline = time.monotonic() + 5
    while not server.registry.certificates_of(DeviceId("leaver")):
        assert time.monotonic() < deadline, "the certificate was never recorded"
        time.sleep(0.02)
    (record,) = server.registry.certificates_of(DeviceId("leaver"))
    assert record.status is CertStatus.ACTIVE
    with Wire(server) as retry:  # same token, same key, same CSR: the certificate again
        retry.send(enroll_request("leaver", token, body))
        reply = retry.reply()
        assert reply.by_front
        assert assert_issued(server, reply, "leaver", key) == record.serial
        # A different key with the spent token is still refused.
        retry.send(enroll_request("leaver", token, csr_body("leaver")))
        assert retry.reply().status == 401
    assert snapshot(server, "leaver") == (1, "active", ["active"])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# --- idle connections ---------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_idle_connections_are_closed(loop: str, tmp_path: Path) -> None:
    head, idle = 0.5, 1.0
    srv = start_server(
        tmp_path / "home",
        loop,
        head_timeout=timedelta(seconds=head),
        idle_timeout=timedelta(seconds=idle),
    )
    try:
        key = generate_key(KeyType.EC_P256)
        token = srv.mint_device("idler")
        opened = time.monotonic()  # before the server sees the connection
        stuck = socket.create_connection(("127.0.0.1", srv.handle.est_port), timeout=5)
        with stuck, Wire(srv) as partial, Wire(srv) as served, Wire(srv) as handed:
            stuck.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes
            partial.send(b"POST " + SIMPLEENROLL + b" HTTP/1.1\r\nHost: loc")
            served.send(enroll_request("idler", token, csr_body("idler", key)))
            assert_issued(srv, served.reply(), "idler", key)
            replied = time.monotonic()
            handed.send(get("/healthz"))
            assert handed.reply().by_aiohttp

            # Half a head: closed once the head deadline passes, not before.
            assert partial.closed_by_server(within=head + 3)
            assert time.monotonic() - opened >= head
            # Still in the TLS handshake: dropped by the same deadline.
            stuck.settimeout(3)
            try:
                assert stuck.recv(1) == b""
            except ConnectionResetError:
                pass
            # Kept alive after its reply, then silent: closed at the idle deadline.
            assert served.closed_by_server(within=idle + 3)
            assert time.monotonic() - replied >= idle
            # Handed over to aiohttp, answered, then silent: the same idle deadline.
            assert handed.closed_by_server(within=3)
    finally:
        srv.stop()


# --- group commit and one-time tokens -----------------------------------------------------------
def run_together(n: int, work: list[bytes], server: LiveServer) -> list[RawReply | BaseException]:
    """Connect n clients (TLS done), then send work[i] on each at once; their replies."""
    results: list[RawReply | BaseException] = [RuntimeError("no reply")] * n
    barrier = threading.Barrier(n)

    def go(i: int) -> None:
        try:
            with Wire(server) as wire:
                barrier.wait(10)
                wire.send(work[i])
                results[i] = wire.reply()
        except BaseException as exc:
            results[i] = exc
            barrier.abort()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return results


def test_every_issuance_goes_through_the_commit_queue(live_server: LiveServer) -> None:
    n = 12
    devices = [f"group-{i}" for i in range(n)]
    keys = [generate_key(KeyType.EC_P256) for _ in range(n)]
    work = [
        enroll_request(dev, live_server.mint_device(dev), csr_body(dev, key))
        for dev, key in zip(devices, keys, strict=True)
    ]
    results = run_together(n, work, live_server)
    for reply, dev, key in zip(results, devices, keys, strict=True):
        assert isinstance(reply, RawReply), reply
        assert reply.by_front
        assert_issued(live_server, reply, dev, key)
    text = live_server.metrics()
    recorded = metric(text, "fleetpki_registry_commit_batch_sum")
    batches = metric(text, "fleetpki_registry_commit_batch_count")
    assert recorded == n  # each issuance committed exactly once, through the queue
    assert 1 <= batches <= n
    assert f'fleetpki_enrollments_total{{result="simpleenroll_ok"}} {n}' in text


def test_concurrent_use_of_one_token_through_the_front(live_server: LiveServer) -> None:
    n = 8
    token = live_server.mint_device("race")
    keys = [generate_key(KeyType.EC_P256) for _ in range(n)]
    work = [enroll_request("race", token, csr_body("race", key)) for key in keys]
    results = run_together(n, work, live_server)
    replies = [r for r in results if isinstance(r, RawReply)]
    assert len(replies) == n, results
    assert all(r.by_front for r in replies), [r.headers for r in replies]  # the lean path
    statuses = [r.status for r in replies]
    assert statuses.count(200) == 1, statuses
    # Losers see 401 (token used) or, once they pile up, 429 from the brute-force throttle.
    assert set(statuses) <= {200, 401, 429}, statuses
    winner = statuses.index(200)
    serial = assert_issued(live_server, replies[winner], "race", keys[winner])
    (record,) = live_server.registry.certificates_of(DeviceId("race"))
    assert record.serial == serial


# --- a failed commit ----------------------------------------------------------------------------
class FailingCommits:
    """Stands in for the commit queue's registry: the next `failures` transactions raise."""

    def __init__(self, registry: Registry, failures: int = 1) -> None:
        self.registry = registry
        self.failures = failures

    def record_issuances(
        self, batch: Sequence[Issuance], *, wait: bool = True
    ) -> list[RegistryError | None]:
        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return self.registry.record_issuances(batch, wait=wait)


def fail_next_commit(server: LiveServer) -> None:
    commits = server.handle.state.commits

    async def swap() -> None:  # on the server's loop, between two flushes
        # The group commit runs on the queue's writer connection (a worker thread) when it
        # has one, as `fleetpki serve` sets it up; else on the loop's registry.
        if commits.writer is not None:
            commits.writer = FailingCommits(commits.writer)  # type: ignore[assignment]
        else:
            commits.registry = FailingCommits(commits.registry)  # type: ignore[assignment]

    server.call(swap())


def test_failed_commit_is_500_and_records_nothing(live_server: LiveServer) -> None:
    key = generate_key(KeyType.EC_P256)
    token = live_server.mint_device("unlucky")
    body = csr_body("unlucky", key)
    fail_next_commit(live_server)
    with Wire(live_server) as wire:
        wire.send(enroll_request("unlucky", token, body))
        reply = wire.reply()
        assert reply.status == 500 and reply.by_front
        assert reply.text == "internal error: the registry could not record the certificate\n"
        assert snapshot(live_server, "unlucky") == (0, "provisioned", [])
        wire.send(enroll_request("unlucky", token, body))  # same connection, token intact
        assert_issued(live_server, wire.reply(), "unlucky", key)


# --- defects of front.py found while writing these (fixed) -------------------------------------
def test_bare_lf_request_is_answered_like_aiohttp(live_server: LiveServer) -> None:
    raw = f"GET {EST}/cacerts HTTP/1.1\nHost: localhost\n\n".encode()
    # aiohttp alone (the plain-HTTP listener) refuses it at once ...
    with socket.create_connection(("127.0.0.1", live_server.handle.http_port), timeout=5) as s:
        s.sendall(raw)
        alone = s.recv(65536)
    assert alone.startswith(b"HTTP/1.0 400 ") or alone.startswith(b"HTTP/1.1 400 "), alone
    # ... and so should the EST listener, whose front end promises aiohttp's answer.
    with Wire(live_server, timeout=2) as wire:
        wire.send(raw)
        try:
            reply = wire.reply()
        except TimeoutError:
            pytest.fail("no reply within 2 s: the front end is still waiting for CRLFCRLF")
        assert reply.status == 400


def test_request_pipelined_behind_a_failed_commit_is_served(live_server: LiveServer) -> None:
    key = generate_key(KeyType.EC_P256)
    first, second = live_server.mint_device("behind-1"), live_server.mint_device("behind-2")
    fail_next_commit(live_server)
    with Wire(live_server, timeout=2) as wire:
        wire.send(
            enroll_request("behind-1", first, csr_body("behind-1"))
            + enroll_request("behind-2", second, csr_body("behind-2", key))
        )
        assert wire.reply().status == 500
        try:
            reply = wire.reply()
        except TimeoutError:
            pytest.fail("the pipelined request got no reply within 2 s")
        assert_issued(live_server, reply, "behind-2", key)


MALFORMED_FIELDS = {
    # RFC 9110 5.1: a field name is a token; aiohttp alone answers 400.
    "space inside a field name": [b"X Bad: 1"],
    # RFC 9110 5.5: CR, LF or NUL in a value: reject or replace with SP, MUST.
    "NUL in a field value": [b"X-Note: a\x00b"],
    "bare CR in a field value": [b"X-Note: a\rb"],
    # RFC 9110 5.5: no control character but HTAB (tests/unit/test_est_front_differential.py).
    "control character in a field value": [b"X-Note: a\x01b"],
    # aiohttp's per-field limit (est/front.py MAX_LINE).
    "field value over MAX_LINE": [b"X-Pad: " + b"p" * (MAX_LINE + 1)],
    # RFC 9112 3.2: MUST answer 400 to an HTTP/1.1 request without Host or with two.
    "two Host fields": [b"Host: elsewhere"],
    "no Host field": None,
}


@pytest.mark.parametrize("case", sorted(MALFORMED_FIELDS))
def test_malformed_fields_are_refused_like_aiohttp(live_server: LiveServer, case: str) -> None:
    extra = MALFORMED_FIELDS[case]
    token = live_server.mint_device("odd-fields")
    body = csr_body("odd-fields")

    def malformed(raw: bytes) -> bytes:
        if extra is None:
            return raw.replace(b"Host: localhost\r\n", b"")
        return raw

    lines = extra or []
    chunked = head("odd-fields", token, extra=[*lines, b"Transfer-Encoding: chunked"])
    requests = {
        # Handed over: what aiohttp answers.
        "chunked": malformed(chunked) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        "lean": malformed(head("odd-fields", token, length=len(body), extra=lines)) + body,
    }
    replies = []
    for raw in requests.values():
        with Wire(live_server, timeout=5) as wire:
            wire.send(raw)
            replies.append(wire.reply())
    handed, lean = replies
    assert handed.status == 400 and handed.by_aiohttp, handed
    assert lean.status == 400, (lean.status, lean.text)
    assert snapshot(live_server, "odd-fields") == (0, "provisioned", [])
