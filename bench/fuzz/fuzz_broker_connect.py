"""Fuzz the broker's pre-authentication input: the first packet of a connection.

The bytes a TLS peer sends before it is identified go through read_connect_frame (one bounded
CONNECT, protocol screened), amqtt's ConnectPacket decoder and session_from_connect, exactly
as HardenedBroker._serve does; anything raised that _serve does not turn into a refusal
(its except clauses, listed here as REFUSED) would kill the connection task with a traceback.
Then the bytes after the CONNECT go through BoundedPacketReader (the packet-size limit of an
admitted connection) the way amqtt's reader loop asks for them.
"""

from __future__ import annotations

import asyncio

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from amqtt.adapters import BufferReader
    from amqtt.errors import AMQTTError, CodecError, MQTTError, NoDataError
    from amqtt.mqtt import packet_class
    from amqtt.mqtt.connect import ConnectPacket
    from amqtt.mqtt.packet import MQTTFixedHeader

    from enroll_server.broker.connect_frame import read_connect_frame
    from enroll_server.broker.errors import BadConnect
    from enroll_server.broker.hardening.lean import session_from_connect
    from enroll_server.broker.hardening.packets import BoundedPacketReader

REFUSED = (BadConnect, AMQTTError, MQTTError, NoDataError, CodecError, ValueError)
MAX_CONNECT = 1024
MAX_PACKET = 512
LOOP = asyncio.new_event_loop()


async def serve(data: bytes) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    try:
        frame = await read_connect_frame(reader, MAX_CONNECT)
    except (BadConnect, asyncio.IncompleteReadError):
        return
    assert len(frame) <= MAX_CONNECT + 5
    try:
        packet = await ConnectPacket.from_stream(BufferReader(frame))
        session_from_connect(packet, ("127.0.0.1", 1))
    except REFUSED:
        return
    violations: list[tuple[str, bool]] = []
    bounded = BoundedPacketReader(
        reader, MAX_PACKET, lambda why, big: violations.append((why, big))
    )
    for _ in range(8):
        try:
            header = await MQTTFixedHeader.from_stream(bounded)
            if header is None:
                return
            await packet_class(header).from_stream(bounded, fixed_header=header)
        except (NoDataError, MQTTError, CodecError, AMQTTError, ValueError):
            return


def test_one_input(data: bytes) -> None:
    LOOP.run_until_complete(serve(data))


def seeds() -> list[bytes]:
    from amqtt.mqtt.connect import ConnectPayload, ConnectVariableHeader
    from amqtt.mqtt.publish import PublishPacket

    out = []
    for will in (False, True):
        header = ConnectVariableHeader()
        header.proto_name = "MQTT"
        header.proto_level = 4
        header.keep_alive = 30
        header.clean_session_flag = True
        payload = ConnectPayload(client_id="dev-0001")
        if will:
            header.will_flag = True
            header.will_qos = 1
            payload.will_topic = "devices/dev-0001/status"
            payload.will_message = b"offline"
        connect = ConnectPacket(variable_header=header, payload=payload).to_bytes()
        publish = PublishPacket.build("devices/dev-0001/telemetry", b"{}", 1, False, 1, False)
        out.append(connect + publish.to_bytes())
    out.append(bytes([0x10, 0x0C, 0, 4]) + b"MQTT" + bytes([5, 2, 0, 30, 0, 0]))
    return out


if __name__ == "__main__":
    _harness.main("broker_connect", test_one_input, seeds)
