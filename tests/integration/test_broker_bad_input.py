"""Bad input with real clients: nothing is accepted, no other session is disturbed.

Each test runs next to a connected witness device (tests.integration.broker_harness.Witness)
that must keep its session, its subscription and its message flow throughout, which also
shows that the broker keeps serving.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta

import aiomqtt
import pytest

from enroll_server.broker import RunningBroker
from tests.integration import broker_harness
from tests.integration.broker_harness import (
    HOST,
    PAHO_ACCEPTED,
    PAHO_IDENTIFIER_REJECTED,
    PAHO_NOT_AUTHORIZED,
    PAHO_UNSUPPORTED_PROTOCOL,
    Creds,
    Fleet,
    PahoDevice,
    RawTls,
    Witness,
    connect_packet,
    mosquitto,
)

fleet = broker_harness.fleet
broker = broker_harness.broker
witness = broker_harness.witness


def _refusals(broker: RunningBroker, reason: str) -> int:
    prefix = f'fleetpki_broker_connections_refused_total{{reason="{reason}"}} '
    for line in broker.metrics_text().splitlines():
        if line.startswith(prefix):
            return int(line.removeprefix(prefix))
    return 0


def _handshake_failures(broker: RunningBroker) -> int:
    for line in broker.metrics_text().splitlines():
        if line.startswith("fleetpki_broker_tls_handshake_failures_total "):
            return int(line.split()[1])
    return 0


def _aiomqtt(creds: Creds, fleet: Fleet, port: int, timeout: float = 5.0) -> aiomqtt.Client:
    return aiomqtt.Client(
        HOST,
        port,
        identifier=creds.device_id,
        tls_context=creds.tls_context(fleet.ca_file),
        protocol=aiomqtt.ProtocolVersion.V311,
        timeout=timeout,
    )


async def _aiomqtt_refusal(client: aiomqtt.Client) -> int | None:
    """The CONNACK code of a refused aiomqtt connect, None if TLS failed first."""
    try:
        async with client:
            pass
    except aiomqtt.MqttCodeError as exc:
        rc = exc.rc
        return int(rc.value) if hasattr(rc, "value") else int(rc)  # type: ignore[arg-type, union-attr]
    except aiomqtt.MqttError:
        return None
    raise AssertionError("the broker accepted the connection")


async def test_no_certificate_paho(fleet: Fleet, broker: RunningBroker, witness: Witness):
    dev = PahoDevice(None, broker.port, fleet.ca_file, client_id="witness")
    rc = await dev.connect()
    await dev.close()
    assert rc is None  # the TLS handshake failed: no CONNACK at all
    assert _handshake_failures(broker) >= 1
    await witness.assert_undisturbed()


async def test_certificate_from_another_ca_mosquitto_sub(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    creds = fleet.foreign("witness")
    status, out = await mosquitto(
        "mosquitto_sub", fleet, broker.port, creds, "-i", "witness", "-t", "devices/witness/#",
        "-C", "1", "-W", "3",
    )  # fmt: skip
    assert status not in (0, -1), out
    assert "Connection refused" not in out  # no CONNACK: TLS said no first
    assert _handshake_failures(broker) >= 1
    await witness.assert_undisturbed()


async def test_expired_certificate_aiomqtt(fleet: Fleet, broker: RunningBroker, witness: Witness):
    past = datetime.now(UTC) - timedelta(days=60)
    creds = fleet.issue("oldie", now=past, validity=timedelta(days=30))
    # TLS 1.3: the client learns of the rejected certificate after its handshake, so aiomqtt
    # waits for a CONNACK that never comes until its timeout.
    assert await _aiomqtt_refusal(_aiomqtt(creds, fleet, broker.port, timeout=1.5)) is None
    assert _handshake_failures(broker) >= 1
    await witness.assert_undisturbed()


async def test_not_yet_valid_certificate_paho(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    creds = fleet.issue("early", now=datetime.now(UTC) + timedelta(days=2))
    dev = PahoDevice(creds, broker.port, fleet.ca_file)
    rc = await dev.connect()
    await dev.close()
    assert rc is None
    await witness.assert_undisturbed()


async def test_revoked_device_mosquitto_pub(fleet: Fleet, broker: RunningBroker, witness: Witness):
    creds = fleet.issue("gone")
    fleet.revoke("gone")
    status, out = await mosquitto(
        "mosquitto_pub", fleet, broker.port, creds, "-i", "gone",
        "-t", "devices/gone/telemetry", "-m", "x",
    )  # fmt: skip
    assert status != 0
    assert "not authorised" in out.lower()
    assert _refusals(broker, "device_revoked") == 1
    await witness.assert_undisturbed()


async def test_suspended_device_aiomqtt(fleet: Fleet, broker: RunningBroker, witness: Witness):
    creds = fleet.issue("paused")
    fleet.suspend("paused")
    assert await _aiomqtt_refusal(_aiomqtt(creds, fleet, broker.port)) == 0x87  # not authorized
    assert _refusals(broker, "device_suspended") == 1
    await witness.assert_undisturbed()


async def test_server_auth_only_certificate_paho(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    """A certificate from our own CA, CN = a registered id, but serverAuth instead of
    clientAuth: OpenSSL's "SSL client" purpose check fails the handshake."""
    fleet.issue("twin")
    creds = fleet.server_auth_only("twin")
    dev = PahoDevice(creds, broker.port, fleet.ca_file)
    rc = await dev.connect()
    await dev.close()
    assert rc is None
    await witness.assert_undisturbed()


async def test_spoofed_client_id_mosquitto_sub(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    creds = fleet.issue("spoofer")
    status, out = await mosquitto(
        "mosquitto_sub", fleet, broker.port, creds, "-i", "witness", "-t", "devices/witness/#",
        "-C", "1", "-W", "3",
    )  # fmt: skip
    assert status not in (0, -1), out
    assert "identifier rejected" in out.lower()
    assert _refusals(broker, "client_id_mismatch") == 1
    await witness.assert_undisturbed()


async def test_spoofed_client_id_paho_gets_identifier_rejected(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    creds = fleet.issue("spoofer2")
    dev = PahoDevice(creds, broker.port, fleet.ca_file, client_id="witness", clean_session=False)
    rc = await dev.connect()
    await dev.close()
    assert rc == PAHO_IDENTIFIER_REJECTED
    await witness.assert_undisturbed()


async def test_publish_outside_own_tree_is_dropped(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    mallory = PahoDevice(fleet.issue("mallory"), broker.port, fleet.ca_file)
    assert await mallory.connect() == PAHO_ACCEPTED
    for topic in ("devices/witness/commands", "devices/witness/telemetry", "fleet/all"):
        mallory.publish(topic, b"evil", qos=1)
    assert await witness.device.next_message(timeout=1.0) is None
    assert "fleetpki_broker_acl_denials_total" in broker.metrics_text()
    # The publisher itself may go on within its own tree.
    assert await mallory.subscribe("devices/mallory/#") == [1]
    mallory.publish("devices/mallory/telemetry", b"fine")
    assert await mallory.next_message() == ("devices/mallory/telemetry", b"fine")
    await mallory.close()
    await witness.assert_undisturbed()


async def test_publish_to_sys_topic_ends_the_session(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    mallory = PahoDevice(fleet.issue("mallory"), broker.port, fleet.ca_file)
    assert await mallory.connect() == PAHO_ACCEPTED
    mallory.publish("$SYS/broker/uptime", b"0", qos=0)
    await broker_harness.eventually(lambda: mallory.disconnects, 3.0, "server closing mallory")
    await broker_harness.eventually(lambda: "mallory" not in broker.connected())
    await mallory.close()
    await witness.assert_undisturbed()


@pytest.mark.parametrize(
    "topic_filter",
    ["devices/+/#", "#", "devices/witness/#", "+/witness/telemetry", "devices/#", "$SYS/#"],
)
async def test_subscribe_outside_own_tree_is_refused_aiomqtt(
    fleet: Fleet, broker: RunningBroker, witness: Witness, topic_filter: str
):
    creds = fleet.issue("snoop")
    async with _aiomqtt(creds, fleet, broker.port) as client:
        granted = await client.subscribe(topic_filter, qos=1)
        codes = [int(getattr(g, "value", g)) for g in granted]  # type: ignore[arg-type]
        assert codes == [0x80]
        await witness.assert_undisturbed()
        ok = await client.subscribe("devices/snoop/commands", qos=1)
        assert [int(getattr(g, "value", g)) for g in ok] == [1]  # type: ignore[arg-type]
    assert "fleetpki_broker_acl_denials_total" in broker.metrics_text()


async def test_subscribe_everything_mosquitto_sub(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    creds = fleet.issue("snoop")
    _, out = await mosquitto(
        "mosquitto_sub", fleet, broker.port, creds, "-i", "snoop", "-t", "#", "-t", "devices/+/#",
        "-C", "1", "-W", "2",
    )  # fmt: skip
    assert "All subscription requests were denied" in out, out
    await witness.assert_undisturbed()


async def test_mqtt5_connect_paho(fleet: Fleet, broker: RunningBroker, witness: Witness):
    creds = fleet.issue("modern")
    dev = PahoDevice(creds, broker.port, fleet.ca_file, protocol=5)
    rc = await dev.connect()
    await dev.close()
    assert rc == PAHO_UNSUPPORTED_PROTOCOL
    assert _refusals(broker, "protocol_version") == 1
    await witness.assert_undisturbed()


async def test_garbage_bytes(fleet: Fleet, broker: RunningBroker, witness: Witness):
    creds = fleet.issue("noisy")
    for garbage in (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00" * 64,
        b"\x10\xff\xff\xff\xff\x7f",
    ):
        conn = await RawTls.open(broker.port, fleet.ca_file, creds)
        await conn.send(garbage)
        assert await conn.until_closed(timeout=2.0) == b""
        conn.close()
    assert _refusals(broker, "malformed_connect") == 3
    await witness.assert_undisturbed()


async def test_garbage_instead_of_tls(fleet: Fleet, broker: RunningBroker, witness: Witness):
    import asyncio

    reader, writer = await asyncio.open_connection(HOST, broker.port)
    writer.write(connect_packet("witness"))  # plain MQTT on the TLS port
    async with asyncio.timeout(3):
        data = await reader.read()
    writer.close()
    assert not data.startswith(b"\x20")  # whatever TLS said, it was not a CONNACK
    await witness.assert_undisturbed()


async def test_client_that_never_sends_connect_is_dropped(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    creds = fleet.issue("mute")
    conn = await RawTls.open(broker.port, fleet.ca_file, creds)
    assert await conn.until_closed(timeout=3.0) == b""  # connect_timeout is 1 s here
    conn.close()
    assert _refusals(broker, "connect_timeout") == 1
    await witness.assert_undisturbed()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_1_1_is_refused(fleet: Fleet, broker: RunningBroker, witness: Witness):
    creds = fleet.issue("legacy")
    ctx = creds.tls_context(fleet.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    before = _handshake_failures(broker)
    dev = aiomqtt.Client(HOST, broker.port, identifier="legacy", tls_context=ctx, timeout=3)
    assert await _aiomqtt_refusal(dev) is None
    await broker_harness.eventually(lambda: _handshake_failures(broker) > before)
    await witness.assert_undisturbed()


async def test_refused_clients_never_reach_not_authorized_for_others(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    """A CONNECT with a foreign will topic is refused as a whole (not silently trimmed)."""
    creds = fleet.issue("willful")
    dev = PahoDevice(creds, broker.port, fleet.ca_file, will=("devices/witness/commands", b"x"))
    assert await dev.connect() == PAHO_NOT_AUTHORIZED
    await dev.close()
    assert _refusals(broker, "will_topic_denied") == 1
    await witness.assert_undisturbed()
