"""Malformed requests in the log (http_log.py): one line each, rate limited, never a secret.

aiohttp quotes the raw request when its parser refuses one; these requests carry a device's
Basic credentials or the admin bearer token next to the fault, on each listener.
"""

from __future__ import annotations

import base64
import logging
import socket
import ssl
from collections.abc import Iterator

import pytest

from enroll_server.web.request_log import RequestLog
from tests.live_server import LiveServer, start_live_server

SECRET = "s3cr3t-t0ken-never-logged"
BASIC = base64.b64encode(f"pi-000001:{SECRET}".encode())


def _faulty_heads(line: bytes, credentials: bytes) -> list[bytes]:
    """Heads aiohttp refuses (400) at or after a credentials field, which it then quotes."""
    host = b"Host: x\r\n"
    return [
        line + b"\r\n" + host + b"Authorization : " + credentials + b"\r\n\r\n",
        line + b"\r\n" + host + b"Authorization: " + credentials + b"\x01\r\n\r\n",
        line + b"\r\n" + host + b"Authorization:\r\n " + credentials + b"\r\n\r\n",
        line + b"\nHost: x\nAuthorization: " + credentials + b"\nBad Name: x\n\n",
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_live_server(tmp_path_factory.mktemp("log") / "home")
    yield srv
    srv.stop()


def _exchange(server: LiveServer, port: int, data: bytes, tls: bool) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock: socket.socket = (
        server.client_ssl().wrap_socket(raw, server_hostname="localhost") if tls else raw
    )
    with sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (ConnectionError, ssl.SSLError):
            pass
        return reply


def _requests(server: LiveServer) -> list[tuple[int, bool, bytes]]:
    basic = b"Basic " + BASIC
    bearer = f"Bearer {server.admin_token}".encode()
    est, admin, http = server.handle.est_port, server.handle.admin_port, server.handle.http_port
    enroll = b"POST /.well-known/est/simpleenroll HTTP/1.1"
    return [
        *((est, True, h) for h in _faulty_heads(enroll, basic)),
        *((est, True, h) for h in _faulty_heads(b"GET /healthz HTTP/1.1", basic)),
        *((admin, True, h) for h in _faulty_heads(b"GET /admin/devices HTTP/1.1", bearer)),
        *((http, False, h) for h in _faulty_heads(b"POST /ocsp HTTP/1.1", basic)),
    ]


def test_malformed_requests_log_one_line_without_secrets(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    requests = _requests(server)
    secrets = [SECRET, BASIC.decode(), server.admin_token]
    for port, tls, data in requests:  # under each listener's rate limit
        caplog.clear()
        reply = _exchange(server, port, data, tls)
        assert b" 400 " in reply.split(b"\r\n", 1)[0], reply[:200]
        records = [r for r in caplog.records if r.name.startswith(("fleetpki", "aiohttp"))]
        text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.exc_info or ''}" for r in records)
        for secret in secrets:
            assert secret not in text
        assert all(r.exc_info is None for r in records), text
        malformed = [r for r in records if "malformed request" in r.getMessage()]
        assert len(malformed) == 1, text
        assert "127.0.0.1" in malformed[0].getMessage()


def test_malformed_requests_are_rate_limited(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for port, tls, data in _requests(server) * 4:
        _exchange(server, port, data, tls)
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    # One RequestLog per listener: at most its window's worth each, whatever arrives.
    assert len(lines) <= 3 * 10, len(lines)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_request_log_window_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    now = [0.0]
    log = RequestLog(
        logging.getLogger("fleetpki.test"), per_window=2, window=10, clock=lambda: now[0]
    )
    caplog.set_level(logging.INFO)
    for _ in range(5):
        log.exception("Error handling request from %s", "10.0.0.1", exc_info=BadHttpMessage(SECRET))
    assert [r.getMessage() for r in caplog.records] == [
        "malformed request from 10.0.0.1 -> 400 (BadHttpMessage)"
    ] * 2
    now[0] = 11.0
    log.exception("Error handling request from %s", "10.0.0.2", exc_info=BadHttpMessage(SECRET))
    assert [r.getMessage() for r in caplog.records[2:]] == [
        "3 more malformed requests not logged in 11 s",
        "malformed request from 10.0.0.2 -> 400 (BadHttpMessage)",
    ]
    try:
        raise RuntimeError("a handler bug")
    except RuntimeError as exc:
        log.exception("Unhandled exception", exc_info=exc)
    assert caplog.records[-1].exc_info is not None  # a bug keeps its traceback
    assert SECRET not in caplog.text
