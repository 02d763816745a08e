"""Fuzz the agent's HTTP/1.1 response parser and what it makes of an EST answer.

The bytes a server (or anything on the path that got past TLS verification) sends back go
through http11.read_response, then EstClient's mapping of the answer (PKCS#7 certs-only on
200, Retry-After on 202, the refusal classes on 4xx/5xx) and the Date header the agent reads
for its clock hint. Only HttpError (the parser) and the agent's own errors (AgentError) may
come out: anything else would end the agent's run loop.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

    from device_agent import http11
    from device_agent.clock import parse_http_date
    from device_agent.config import EstServer
    from device_agent.errors import AgentError
    from device_agent.est_client import EstClient
    from device_agent.est_wire import parse_retry_after
    from tests.pki_helpers import make_ca

LOOP = asyncio.new_event_loop()
CLIENT = EstClient(EstServer("https://localhost:8443", "localhost", 8443, ""), Path("/nonexistent"))
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


async def exchange(data: bytes, head_only: bool) -> http11.HttpResponse:
    reader = asyncio.StreamReader(limit=http11.MAX_HEADER)
    reader.feed_data(data)
    reader.feed_eof()
    return await http11.read_response(reader, head_only)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    try:
        response = LOOP.run_until_complete(exchange(data[1:], head_only=data[0] == 0xFF))
    except http11.HttpError:
        return
    assert 0 <= response.status and len(response.body) <= http11.MAX_BODY
    parse_http_date(response.header("date"))
    parse_retry_after(response.header("retry-after"), NOW)
    try:
        CLIENT._certs(response, "simpleenroll")
    except AgentError:
        pass


def seeds() -> list[bytes]:
    ca = make_ca()
    cert, _ = ca.device_cert("dev-0001")
    body = pkcs7.serialize_certificates([cert, ca.issuing.cert], Encoding.DER)
    import base64

    b64 = base64.encodebytes(body)
    date = b"Date: Sat, 05 Dec 2026 12:00:00 GMT\r\n"
    return [
        b"\x00HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        + date
        + b"Content-Length: %d\r\n\r\n" % len(b64)
        + b64,
        b"\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(b64), b64),
        b"\x00HTTP/1.1 202 Accepted\r\nRetry-After: 120\r\nContent-Length: 0\r\n\r\n",
        b"\x00HTTP/1.1 403 Forbidden\r\nFleetpki-Error: device-revoked\r\n"
        b"Content-Length: 16\r\n\r\ndevice revoked\r\n",
        b"\x00HTTP/1.0 503 Unavailable\r\nRetry-After: Sat, 05 Dec 2026 12:01:00 GMT\r\n\r\nbusy",
        b"\xffHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    ]


if __name__ == "__main__":
    _harness.main("agent_http", test_one_input, seeds)
