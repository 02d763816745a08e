"""The first packet of a connection: read one bounded CONNECT frame and screen its version."""

from __future__ import annotations

import asyncio

from enroll_server.broker.errors import BadConnect

# MQTT 3.1.1 section 2.2.1/3.1.1: CONNECT is packet type 1 with flags 0 ([MQTT-2.2.2-2]).
_CONNECT_BYTE = 0x10
# A device CONNECT is client id + will (+ unused credentials): a few hundred bytes. Bounding it
# stops a peer from making the broker buffer megabytes before it has been identified.
DEFAULT_MAX_CONNECT_SIZE = 16 * 1024

# Answers to a CONNECT of a version we do not speak, sent before closing:
# MQTT 5.0 section 3.1.2.2 -- a v5 CONNACK with reason code 0x84 (Unsupported Protocol
# Version) and an empty property list; MQTT 3.1.1 section 3.1.2.2 -- return code 0x01.
CONNACK_V5_UNSUPPORTED_VERSION = bytes([0x20, 0x03, 0x00, 0x84, 0x00])
CONNACK_V311_UNACCEPTABLE_VERSION = bytes([0x20, 0x02, 0x00, 0x01])


def refusal_connack(code: int) -> bytes:
    """A 3.1.1 CONNACK with session-present 0 and `code` (section 3.2.2.3)."""
    return bytes([0x20, 0x02, 0x00, code])


def unsupported_version_reply(level: int) -> bytes:
    return CONNACK_V5_UNSUPPORTED_VERSION if level >= 5 else CONNACK_V311_UNACCEPTABLE_VERSION


def screen_protocol(body: bytes) -> None:
    """Check the protocol name and level at the head of a CONNECT variable header.

    Raises BadConnect (with `protocol_level` set for a known MQTT version we do not serve).
    """
    if len(body) < 10:
        raise BadConnect(f"CONNECT of {len(body)} bytes is shorter than its variable header")
    name_len = int.from_bytes(body[0:2], "big")
    if 2 + name_len >= len(body):
        raise BadConnect(f"protocol name length {name_len} runs past the packet")
    name = body[2 : 2 + name_len]
    level = body[2 + name_len]
    if name == b"MQTT" and level == 4:
        return
    if (name == b"MQTT" and level in (5, 6, 7)) or (name == b"MQIsdp" and level == 3):
        raise BadConnect(f"MQTT protocol level {level} is not served (3.1.1 only)", level)
    raise BadConnect(f"protocol name {name!r} level {level} is not MQTT")


async def read_remaining_length(reader: asyncio.StreamReader) -> tuple[bytes, int | None]:
    """The Remaining Length field of a fixed header: (its bytes, its value).

    MQTT 3.1.1 section 2.2.3: a variable-length integer of at most four bytes; the value is
    None when a fourth byte still says "more follows" (a malformed packet). Reads only the
    field itself, so a caller can refuse a packet before a byte of its body is buffered.
    """
    encoded = bytearray()
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        encoded.append(byte)
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return bytes(encoded), length
    return bytes(encoded), None


async def read_connect_frame(
    reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_CONNECT_SIZE
) -> bytes:
    """Read exactly one CONNECT packet (fixed header included) and screen its version.

    Raises BadConnect for anything else, asyncio.IncompleteReadError if the peer goes away.
    """
    first = await reader.readexactly(1)
    if first[0] != _CONNECT_BYTE:
        # [MQTT-3.1.0-1]: the first packet from the client must be CONNECT.
        raise BadConnect(f"first byte 0x{first[0]:02x} is not a CONNECT fixed header")
    encoded, length = await read_remaining_length(reader)
    if length is None:
        raise BadConnect("remaining length is longer than four bytes")
    header = first + encoded
    if length > max_size:
        raise BadConnect(f"CONNECT of {length} bytes exceeds the {max_size}-byte limit")
    body = await reader.readexactly(length)
    screen_protocol(body)
    return header + body
