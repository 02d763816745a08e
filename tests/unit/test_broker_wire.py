"""The broker's pure pieces on the wire side: CONNECT screening, topic policy, metrics text."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from amqtt.contexts import Action
from amqtt.session import Session

from enroll_server.broker.acl import ADMISSION_KEY, allows
from enroll_server.broker.connect_frame import (
    CONNACK_V5_UNSUPPORTED_VERSION,
    CONNACK_V311_UNACCEPTABLE_VERSION,
    read_connect_frame,
    refusal_connack,
    unsupported_version_reply,
)
from enroll_server.broker.errors import BadConnect
from enroll_server.broker.metrics import BrokerMetrics
from enroll_server.broker.policy import Admission
from fleetpki.topics import Role


def _connect(name: bytes = b"MQTT", level: int = 4, client_id: bytes = b"dev1") -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes([level, 0x02, 0, 60])
    if level == 5:
        body += b"\x00"
    body += len(client_id).to_bytes(2, "big") + client_id
    return bytes([0x10, len(body)]) + body


async def _read(data: bytes, max_size: int = 16 * 1024) -> bytes:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_connect_frame(reader, max_size)


async def test_a_311_connect_frame_is_read_whole() -> None:
    frame = _connect()
    assert await _read(frame + b"\xc0\x00") == frame  # a following PINGREQ stays unread


@pytest.mark.parametrize(
    ("frame", "level"),
    [(_connect(level=5), 5), (_connect(b"MQIsdp", 3), 3)],
)
async def test_other_mqtt_versions_are_named(frame: bytes, level: int) -> None:
    with pytest.raises(BadConnect) as err:
        await _read(frame)
    assert err.value.protocol_level == level


@pytest.mark.parametrize(
    "data",
    [
        b"\x30\x02ab",  # PUBLISH first [MQTT-3.1.0-1]
        b"\x11\x02ab",  # CONNECT with flags [MQTT-2.2.2-2]
        b"\x10\xff\xff\xff\xff\x01",  # remaining length of five bytes
        b"\x10\x80\x80\x04",  # 64 KiB: over the limit
        _connect(b"HTTP"),
        b"\x10\x03\x00\x04M",  # shorter than a variable header
    ],
)
async def test_garbage_is_refused_without_a_reply(data: bytes) -> None:
    with pytest.raises(BadConnect) as err:
        await _read(data)
    assert err.value.protocol_level is None


async def test_a_truncated_frame_is_end_of_stream() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await _read(_connect()[:-3])


def test_replies() -> None:
    # MQTT 5.0 section 3.2: fixed header, flags, reason code 0x84, property length 0.
    assert unsupported_version_reply(5) == CONNACK_V5_UNSUPPORTED_VERSION == b"\x20\x03\x00\x84\x00"
    assert unsupported_version_reply(3) == CONNACK_V311_UNACCEPTABLE_VERSION
    assert refusal_connack(5) == b"\x20\x02\x00\x05"


def _session(identity: str | None, role: Role = Role.DEVICE) -> Session:
    s = Session()
    if identity is not None:
        s.attributes[ADMISSION_KEY] = Admission(identity, role, 1, datetime.now(UTC))
    return s


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        ("devices/dev1/telemetry", Action.PUBLISH, True),
        ("devices/dev2/telemetry", Action.PUBLISH, False),
        ("devices/dev1/#", Action.SUBSCRIBE, True),
        ("devices/+/#", Action.SUBSCRIBE, False),
        ("#", Action.SUBSCRIBE, False),
        ("$SYS/#", Action.SUBSCRIBE, False),
        ("devices/dev2/commands", Action.RECEIVE, True),
    ],
)
def test_device_policy(topic: str, action: Action, allowed: bool) -> None:
    assert allows(_session("dev1"), topic, action) is allowed


def test_service_policy() -> None:
    svc = _session("backend", Role.SERVICE)
    assert allows(svc, "devices/+/telemetry", Action.SUBSCRIBE)
    assert allows(svc, "devices/dev9/commands", Action.PUBLISH)
    assert not allows(svc, "devices/dev9/telemetry", Action.PUBLISH)
    assert not allows(svc, "devices/#", Action.SUBSCRIBE)


def test_unadmitted_session_may_do_nothing() -> None:
    assert not allows(_session(None), "devices/dev1/telemetry", Action.PUBLISH)
    assert not allows(None, "devices/dev1/telemetry", Action.SUBSCRIBE)


def test_metrics_exposition() -> None:
    m = BrokerMetrics()
    m.accepted = 3
    m.refused("cert_revoked")
    m.refused("cert_revoked")
    m.refused('we"ird')
    m.dropped("revoked")
    m.denied("publish")
    m.tls_handshake_failures = 4
    text = m.render({"device": 2})
    lines = text.splitlines()
    assert 'fleetpki_broker_connected_clients{role="device"} 2' in lines
    assert 'fleetpki_broker_connected_clients{role="service"} 0' in lines
    assert "fleetpki_broker_connections_accepted_total 3" in lines
    assert 'fleetpki_broker_connections_refused_total{reason="cert_revoked"} 2' in lines
    assert 'fleetpki_broker_connections_refused_total{reason="we\\"ird"} 1' in lines
    assert 'fleetpki_broker_sessions_dropped_total{reason="revoked"} 1' in lines
    assert 'fleetpki_broker_acl_denials_total{action="publish"} 1' in lines
    assert "fleetpki_broker_tls_handshake_failures_total 4" in lines
    assert text.endswith("\n")
    # Every sample belongs to a declared metric family.
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if not line.startswith("#"):
            assert line.split("{")[0].split(" ")[0] in families
