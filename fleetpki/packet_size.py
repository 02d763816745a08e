"""The MQTT maximum packet size: its default and valid range (broker, mosquitto, config)."""

from __future__ import annotations

# Telemetry and commands are small; 256 KiB leaves room for a firmware manifest or a batch of
# readings and keeps one connection from making a broker hold megabytes (amqtt itself takes
# up to 256 MiB, the MQTT 3.1.1 maximum). Counted as mosquitto's `max_packet_size` counts:
# the whole packet, fixed header included.
DEFAULT_MAX_PACKET_SIZE = 256 * 1024
# mosquitto refuses max_packet_size below 20 (mosquitto.conf(5)); a limit that small would
# break every client (and mosquitto-sync's own dynsec commands), so the floor is a usable one.
MIN_MAX_PACKET_SIZE = 1024
# MQTT 3.1.1 section 2.2.3: remaining length at most 268,435,455, plus up to 5 header bytes.
MAX_MAX_PACKET_SIZE = 268_435_455 + 5


def check_max_packet_size(value: int) -> int:
    """`value` if it is a usable maximum packet size; ValueError naming it otherwise."""
    if not MIN_MAX_PACKET_SIZE <= value <= MAX_MAX_PACKET_SIZE:
        raise ValueError(
            f"max_packet_size {value} is out of range "
            f"{MIN_MAX_PACKET_SIZE}..{MAX_MAX_PACKET_SIZE} bytes"
        )
    return value
