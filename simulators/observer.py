"""The telemetry observer: a backend service identity that counts what devices really delivered.

It subscribes to `devices/+/telemetry` over mTLS like any backend would, so "received" in the
report is what crossed the broker, not what the agents believe they sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
from aiomqtt.client import ProtocolVersion

from enroll_server.enrollment.identities import ServiceIdentity, issue_service_identity
from simulators.trace import Journal

log = logging.getLogger("fleetpki.simulator")

TELEMETRY_FILTER = "devices/+/telemetry"


def issue_observer(home: Path, name: str, out: Path) -> ServiceIdentity:
    """A service certificate for the observer (as `fleetpki service issue NAME` makes)."""
    return issue_service_identity(home, name, out, datetime.now(UTC))


class Observer:
    """Counts distinct telemetry messages per device; reconnects if the broker goes away."""

    def __init__(
        self, host: str, port: int, identity: ServiceIdentity, name: str, journal: Journal
    ) -> None:
        self.host = host
        self.port = port
        self.identity = identity
        self.name = name
        self.journal = journal
        self.subscribed = asyncio.Event()
        # QoS 1 is at-least-once: a redelivered duplicate must not count twice.
        self._seen: dict[str, set[int]] = defaultdict(set)
        self.messages = 0
        # Called with (device id, payload) for every telemetry message, duplicates included
        # (the soak matches them against the agents' delivery receipts). With any listener the
        # observer keeps no per-device record of its own: a long run's memory stays flat.
        self.listeners: list[Callable[[str, bytes], None]] = []

    def _tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.identity.ca))
        ctx.load_cert_chain(str(self.identity.cert), str(self.identity.key))
        return ctx

    def _count(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 3:
            return
        device_id = parts[1]
        if self.listeners:
            self.messages += 1
            for listener in self.listeners:
                listener(device_id, payload)
            return
        seen = self._seen[device_id]
        digest = hash(payload)
        if digest not in seen:
            seen.add(digest)
            self.messages += 1
            if device_id in self.journal.traces:
                self.journal.traces[device_id].received += 1

    async def run(self) -> None:
        """Until cancelled: connect, subscribe, count; retry every half second when down."""
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.name,
                    protocol=ProtocolVersion.V311,
                    tls_context=self._tls(),
                    keepalive=30,
                    clean_session=True,
                    timeout=10,
                ) as client:
                    await client.subscribe(TELEMETRY_FILTER, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        payload = message.payload
                        data = payload if isinstance(payload, bytes) else str(payload).encode()
                        self._count(str(message.topic), data)
            except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
                self.subscribed.clear()
                log.debug("observer disconnected: %s", exc)
            await asyncio.sleep(0.5)

    async def wait_subscribed(self, within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.subscribed.wait()
        return self.subscribed.is_set()
