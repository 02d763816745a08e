"""The error tree of the embedded broker; each error carries the offending value."""

from __future__ import annotations

from pathlib import Path


class BrokerError(Exception):
    """Base of every error raised by enroll_server.broker."""


class UnsupportedAmqtt(BrokerError):
    """An amqtt release other than the one the private hooks of broker/hardening/ target."""

    def __init__(self, found: str, expected: str) -> None:
        super().__init__(
            f"amqtt {found} is installed but the broker hardening is written for amqtt "
            f"{expected} exactly; install amqtt=={expected}"
        )
        self.found = found
        self.expected = expected


class TlsSetupError(BrokerError):
    """A certificate, key or CA file the broker's TLS listener cannot load."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"cannot load {path} for the broker's TLS listener: {why}")
        self.path = path
        self.why = why


class BrokerStartError(BrokerError):
    """The listener could not be started (port in use, bad address, ...)."""

    def __init__(self, host: str, port: int, why: str) -> None:
        super().__init__(f"cannot start the MQTT broker on {host}:{port}: {why}")
        self.host = host
        self.port = port
        self.why = why


class BadConnect(BrokerError):
    """The first packet of a connection is not an acceptable MQTT 3.1.1 CONNECT.

    `protocol_level` is set when the packet is a CONNECT of another MQTT version
    (3 for MQTT 3.1, 5 for MQTT 5.0), which is answered before closing.
    """

    def __init__(self, why: str, protocol_level: int | None = None) -> None:
        super().__init__(f"first packet refused: {why}")
        self.why = why
        self.protocol_level = protocol_level
