"""The broker's maximum packet size: an oversized PUBLISH ends the connection before its body.

Without the limit amqtt buffers a PUBLISH of up to 256 MiB (the MQTT 3.1.1 maximum) before it
looks at it; one 64 MiB PUBLISH from an enrolled device tripled the broker's memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import ssl
from pathlib import Path

import pytest

from enroll_server.broker import RunningBroker, start_broker
from enroll_server.broker.cli import broker_config_for_home
from tests.integration import broker_harness
from tests.integration.broker_harness import (
    PAHO_ACCEPTED,
    Fleet,
    PahoDevice,
    RawTls,
    Witness,
    connect_packet,
)
from tests.live_server import make_home

fleet = broker_harness.fleet
broker = broker_harness.broker
witness = broker_harness.witness


def _remaining_length(n: int) -> bytes:
    """MQTT 3.1.1 section 2.2.3 variable-length integer."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish_header(topic: str, payload_size: int) -> bytes:
    """The fixed header and topic of a QoS 0 PUBLISH whose payload follows separately."""
    name = topic.encode()
    variable = len(name).to_bytes(2, "big") + name
    return b"\x30" + _remaining_length(len(variable) + payload_size) + variable


def _drops(broker: RunningBroker, reason: str) -> int:
    prefix = f'fleetpki_broker_sessions_dropped_total{{reason="{reason}"}} '
    for line in broker.metrics_text().splitlines():
        if line.startswith(prefix):
            return int(line.removeprefix(prefix))
    return 0


def _max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def test_a_64_mib_publish_is_cut_off_at_its_header(
    fleet: Fleet, broker: RunningBroker, witness: Witness
) -> None:
    creds = fleet.issue("bloat")
    raw = await RawTls.open(broker.port, fleet.ca_file, creds)
    try:
        await raw.send(connect_packet("bloat"))
        assert await raw.recv_exactly(4) == b"\x20\x02\x00\x00"
        rss_before = _max_rss_kib()
        size = 64 * 1024 * 1024
        await raw.send(_publish_header("devices/bloat/telemetry", size))
        chunk = b"\x00" * (256 * 1024)

        def stream() -> int:
            """Send the payload until the server closes; how many bytes got out."""
            sent = 0
            raw.sock.settimeout(5)
            try:
                while sent < size:
                    raw.sock.sendall(chunk)
                    sent += len(chunk)
            except (ssl.SSLError, OSError):
                pass
            return sent

        sent = await asyncio.to_thread(stream)
        # Closed long before the payload was through: the kernel buffers hold a few MiB at most.
        assert sent < size // 4, f"the broker took {sent} bytes of a {size}-byte PUBLISH"
        await broker_harness.eventually(lambda: "bloat" not in broker.connected())
        assert _drops(broker, "packet_too_large") == 1
        # The bonus check: the broker (in this process) did not buffer the payload.
        assert _max_rss_kib() - rss_before < 32 * 1024
    finally:
        raw.close()
    await witness.assert_undisturbed()


async def test_paho_publish_over_the_limit_disconnects_and_under_it_is_delivered(
    fleet: Fleet,
) -> None:
    running = await start_broker(fleet.config(max_packet_size=4096))
    try:
        reader = PahoDevice(fleet.issue("reader"), running.port, fleet.ca_file)
        assert await reader.connect() == PAHO_ACCEPTED
        assert await reader.subscribe("devices/reader/#") == [1]
        big = PahoDevice(fleet.issue("big"), running.port, fleet.ca_file)
        assert await big.connect() == PAHO_ACCEPTED
        big.publish("devices/big/telemetry", b"x" * 5000)
        await broker_harness.eventually(lambda: big.disconnects, 3.0, "the broker closing big")
        assert "big" not in running.connected()
        # A packet just under the limit (header + topic + payload <= 4096) goes through.
        topic = "devices/reader/telemetry"
        fits = b"y" * (4096 - len(_publish_header(topic, 0)) - 2 - 2)  # QoS 1: packet id
        reader.publish(topic, fits)
        assert await reader.next_message() == (topic, fits)
        await big.close()
        await reader.close()
    finally:
        await running.stop()


def test_the_limit_comes_from_the_config_and_the_command_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    assert broker_config_for_home(home).max_packet_size == 256 * 1024
    config = home / "fleetpki.toml"
    config.write_text(
        config.read_text().replace("max_packet_size = 262144", "max_packet_size = 9999")
    )
    assert broker_config_for_home(home).max_packet_size == 9999
    assert broker_config_for_home(home, max_packet_size=5000).max_packet_size == 5000


@pytest.mark.parametrize("bad", [0, 1000, 268_435_461])
def test_an_unusable_limit_is_refused(fleet: Fleet, bad: int) -> None:
    with pytest.raises(ValueError, match=f"max_packet_size {bad} is out of range"):
        dataclasses.replace(fleet.config(), max_packet_size=bad)


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        # A PUBLISH of 5 bytes whose topic claims 100: the field runs past its packet.
        (b"\x30\x05\x00\x64abc", "runs past"),
        # Section 2.2.3: a remaining length of five bytes.
        (b"\x30\xff\xff\xff\xff\x01", "longer than four bytes"),
    ],
)
async def test_a_malformed_length_ends_the_connection(
    fleet: Fleet,
    broker: RunningBroker,
    witness: Witness,
    packet: bytes,
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    creds = fleet.issue("liar")
    raw = await RawTls.open(broker.port, fleet.ca_file, creds)
    try:
        await raw.send(connect_packet("liar"))
        assert await raw.recv_exactly(4) == b"\x20\x02\x00\x00"
        await raw.send(packet + b"\x00" * 200)  # whatever follows is not read as packets
        assert await raw.until_closed() == b""
    finally:
        raw.close()
    await broker_harness.eventually(lambda: "liar" not in broker.connected())
    assert _drops(broker, "protocol_error") == 1
    assert any(why in r.getMessage() for r in caplog.records)
    await witness.assert_undisturbed()


def test_serve_and_broker_refuse_an_unusable_limit_before_starting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from enroll_server.cli.app import app

    home = tmp_path / "home"
    make_home(home)
    runner = CliRunner()
    for command in ("serve", "broker"):
        result = runner.invoke(app, [command, "--home", str(home), "--max-packet-size", "5"])
        assert result.exit_code == 2, result.output
        assert "max_packet_size 5 is out of range" in result.output
