"""One broker connection: its admission, the one way to end it, its keepalive watchdog."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from enroll_server.broker.hardening.tls import MqttStreamProtocol
from enroll_server.broker.policy import Admission

# Why a live session was ended by the broker (the `reason` label of the drop metric).
DROP_REVOKED = "revoked"
DROP_SUSPENDED = "suspended"
DROP_OPERATOR = "operator"
DROP_CERT_EXPIRED = "cert_expired"
DROP_KEEPALIVE = "keepalive_timeout"
DROP_TAKEN_OVER = "taken_over"
DROP_PROTOCOL_ERROR = "protocol_error"
DROP_PACKET_TOO_LARGE = "packet_too_large"


class Connection:
    """One accepted TLS connection and, once admitted, its amqtt session and handler."""

    __slots__ = (
        "_done",
        "_done_waiter",
        "admission",
        "drop_reason",
        "handler",
        "protocol",
        "reader",
        "session",
        "watchdog",
        "writer",
    )

    def __init__(
        self,
        protocol: MqttStreamProtocol,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.protocol = protocol
        self.reader = reader
        self.writer = writer
        self.admission: Admission | None = None
        self.session: Session | None = None
        self.handler: BrokerProtocolHandler | None = None
        self.drop_reason: str | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        # Ended and cleaned up. A future only when someone waits (a takeover, shutdown): an
        # asyncio.Event per idle connection costs ~700 bytes for nothing.
        self._done = False
        self._done_waiter: asyncio.Future[None] | None = None

    def mark_finished(self) -> None:
        self._done = True
        if self._done_waiter is not None and not self._done_waiter.done():
            self._done_waiter.set_result(None)

    async def wait_finished(self) -> None:
        if self._done:
            return
        if self._done_waiter is None:
            self._done_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._done_waiter)

    def peer_certificate(self) -> bytes | None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der: bytes | None = ssl_object.getpeercert(binary_form=True)
        return der

    def sever(self, reason: str, *, publish_will: bool) -> None:
        """End this connection now; amqtt sees an abnormal close and cleans up itself.

        amqtt 0.12.1 has no public disconnect. Aborting the transport is the cleanest hook:
        the reader gets EOF, the handler resolves its disconnect waiter with None and the
        broker runs its normal "connection lost" path (will, session state, plugins). Clearing
        `will_flag` first is what makes that path skip the will (revocation must not let a
        revoked device speak once more; MQTT 3.1.1 section 3.1.2.5 only requires the will for
        failures of the client).
        """
        if self.drop_reason is None:
            self.drop_reason = reason
        if not publish_will and self.session is not None:
            self.session.will_flag = False
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.writer.transport.abort()

    def arm_watchdog(self, idle_limit: float, on_expiry: Callable[[Connection], None]) -> None:
        """4. Keepalive: drop after `idle_limit` seconds without a byte from the peer.

        One timer per connection, re-armed lazily: it fires at last_rx + limit at the earliest
        and re-schedules itself for the remainder if data arrived meanwhile. Unlike amqtt's
        per-packet read timeout (which it ignores anyway) this also catches a peer that stalls
        in the middle of a packet.
        """
        loop = asyncio.get_running_loop()

        def check() -> None:
            idle = time.monotonic() - self.protocol.last_rx
            if idle >= idle_limit:
                self.watchdog = None
                on_expiry(self)
            else:
                self.watchdog = loop.call_later(idle_limit - idle, check)

        self.watchdog = loop.call_later(idle_limit, check)
