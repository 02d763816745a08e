"""The broker's lean TLS protocol (a private asyncio class) is probed at start-up; if the probe
fails, the listener serves through asyncio's public TLS path with the same rules."""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto

import pytest

from enroll_server.broker import start_broker
from enroll_server.broker.hardening import broker as hardened
from enroll_server.broker.hardening.tls import (
    LeanSSLProtocol,
    MqttStreamProtocol,
    lean_tls_unavailable,
    server_tls_context,
)
from tests.integration import broker_harness
from tests.integration.broker_harness import (
    PAHO_ACCEPTED,
    Fleet,
    PahoDevice,
    RawTls,
    connect_packet,
)

fleet = broker_harness.fleet  # the fixture


def _context(fleet: Fleet) -> ssl.SSLContext:
    return server_tls_context(fleet.server_cert, fleet.server_key, fleet.ca_file)


async def test_probe_passes_on_this_python(fleet: Fleet) -> None:
    assert lean_tls_unavailable(asyncio.get_running_loop(), _context(fleet)) is None


async def test_probe_names_a_missing_private_hook(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(sslproto.SSLProtocol, "_on_handshake_complete")
    why = lean_tls_unavailable(asyncio.get_running_loop(), _context(fleet))
    assert why is not None and "_on_handshake_complete" in why


async def test_probe_notices_a_read_buffer_it_cannot_share(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CPython whose get_buffer stops handing out _ssl_buffer_view (say, a new attribute
    # name): the shared buffer would be ignored and each connection would allocate its own.
    def fresh_buffer(self: sslproto.SSLProtocol, n: int) -> memoryview:
        return memoryview(bytearray(64))

    monkeypatch.setattr(sslproto.SSLProtocol, "get_buffer", fresh_buffer)
    why = lean_tls_unavailable(asyncio.get_running_loop(), _context(fleet))
    assert why is not None and "get_buffer" in why


async def _serve_and_check(fleet: Fleet) -> str:
    """Start a broker, admit a real device, refuse a client without a certificate."""
    running = await start_broker(fleet.config())
    try:
        device = PahoDevice(fleet.issue("dev-tls-2"), running.port, fleet.ca_file)
        try:
            assert await device.connect() == PAHO_ACCEPTED
            assert "dev-tls-2" in running.connected()
        finally:
            await device.close()
        got = b""
        try:
            raw = await RawTls.open(running.port, fleet.ca_file, None)
            await raw.send(connect_packet("dev-tls-2"))
            got = await raw.until_closed()
            raw.close()
        except (ssl.SSLError, ConnectionError):
            pass
        assert got == b"", f"answered MQTT without a client certificate: {got!r}"
        return running.metrics_text()
    finally:
        await running.stop()


async def test_lean_path_serves_when_the_probe_passes(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[type] = []
    original = LeanSSLProtocol.__init__

    def spy(self: LeanSSLProtocol, *args: object, **kwargs: object) -> None:
        made.append(type(self))
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LeanSSLProtocol, "__init__", spy)
    metrics = await _serve_and_check(fleet)
    assert made, "the listener did not use the lean protocol"
    assert "fleetpki_broker_tls_fast_path 1" in metrics


async def test_public_path_serves_when_the_probe_fails(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hardened, "lean_tls_unavailable", lambda loop, ctx: "probe says no")
    lean_made: list[object] = []
    plain_made: list[object] = []
    lean_init = LeanSSLProtocol.__init__
    plain_init = MqttStreamProtocol.__init__

    def lean_spy(self: LeanSSLProtocol, *args: object, **kwargs: object) -> None:
        lean_made.append(self)
        lean_init(self, *args, **kwargs)  # type: ignore[arg-type]

    def plain_spy(self: MqttStreamProtocol, *args: object, **kwargs: object) -> None:
        plain_made.append(self)
        plain_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LeanSSLProtocol, "__init__", lean_spy)
    monkeypatch.setattr(MqttStreamProtocol, "__init__", plain_spy)
    with caplog.at_level(logging.WARNING, logger="enroll_server.broker.hardening.broker"):
        metrics = await _serve_and_check(fleet)
    assert not lean_made, "the lean protocol ran although its probe failed"
    assert plain_made, "no connection went through the public TLS path"
    assert "fleetpki_broker_tls_fast_path 0" in metrics
    assert any("probe says no" in r.getMessage() for r in caplog.records)
