"""Starting and stopping the embedded broker: BrokerConfig in, RunningBroker out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from amqtt.errors import BrokerError as AmqttBrokerError

from enroll_server.broker.connect_frame import DEFAULT_MAX_CONNECT_SIZE
from enroll_server.broker.errors import BrokerStartError
from enroll_server.broker.gate import AdmissionGate, RegistryReader
from enroll_server.broker.hardening import (
    DROP_OPERATOR,
    HardenedBroker,
    check_amqtt_version,
    server_tls_context,
)
from enroll_server.broker.metrics import BrokerMetrics
from enroll_server.broker.policy import KeepalivePolicy
from enroll_server.broker.revocation import EventSource, RevocationWatcher
from fleetpki.identity import DeviceId
from fleetpki.packet_size import DEFAULT_MAX_PACKET_SIZE, check_max_packet_size

if TYPE_CHECKING:
    from enroll_server.registry.location import RegistryLocation

log = logging.getLogger(__name__)

POLICY_PLUGIN = "enroll_server.broker.acl.TopicPolicyPlugin"


class BrokerRegistry(RegistryReader, EventSource, Protocol):
    """The registry as the broker uses it: admission look-ups and the event log."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything the embedded broker needs.

    `ca_file`: the trust anchors for client certificates (issuing CA + root, PEM) -- nothing
    else is trusted. `server_cert`: the broker's certificate, followed by the issuing CA.
    `port=0` binds an ephemeral port (read it back from RunningBroker.port).
    `max_connections`: open TLS connections at most; further ones are closed at once.
    `connect_timeout`: seconds a TLS connection may take to send its CONNECT.
    `revocation_poll_interval`: how often the registry event log is read (drop latency).
    `expiry_sweep_interval`: how often live sessions are checked for expired certificates.
    `session_expiry`: seconds a disconnected clean_session=False session is kept (None: ever).
    `max_packet_size`: bytes; a client that sends a larger packet after CONNECT is
    disconnected before its body is read (hardening/packets.py).
    `policy_enabled=False` turns the topic policy off -- only for the overhead benchmark.
    """

    server_cert: Path
    server_key: Path
    ca_file: Path
    # The registry: an SQLite file, or a RegistryLocation (home.registry_location).
    registry_path: Path | RegistryLocation
    host: str = "127.0.0.1"
    port: int = 8883
    keepalive: KeepalivePolicy = field(default_factory=KeepalivePolicy)
    max_connections: int = 20_000
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    revocation_poll_interval: float = 0.2
    expiry_sweep_interval: float = 5.0
    session_expiry: int | None = 7 * 24 * 3600
    max_connect_size: int = DEFAULT_MAX_CONNECT_SIZE
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    policy_enabled: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 0..65535")
        for name in (
            "connect_timeout",
            "handshake_timeout",
            "revocation_poll_interval",
            "expiry_sweep_interval",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        check_max_packet_size(self.max_packet_size)
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")


def _amqtt_config(config: BrokerConfig) -> dict[str, Any]:
    bind_host = f"[{config.host}]" if ":" in config.host else config.host
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"{bind_host}:{config.port}",
                "max_connections": config.max_connections,
                # The context itself comes from HardenedBroker (server_tls_context).
                "ssl": True,
            }
        },
        # No $SYS plugin, no anonymous or password authentication: admission is certificate
        # based (HardenedBroker._serve) and the topic policy is the only plugin.
        "plugins": {POLICY_PLUGIN: {}} if config.policy_enabled else {},
        "session_expiry_interval": config.session_expiry,
        "timeout_disconnect_delay": 0,
    }


class RunningBroker:
    """A started broker: its bound port, an in-process drop hook, metrics, and stop()."""

    def __init__(
        self,
        broker: HardenedBroker,
        watcher: RevocationWatcher,
        watcher_task: asyncio.Task[None],
        metrics: BrokerMetrics,
        host: str,
        close_registry: Callable[[], None] | None,
    ) -> None:
        self._broker = broker
        self._watcher = watcher
        self._watcher_task = watcher_task
        self._metrics = metrics
        self._close_registry = close_registry
        self.host = host
        self.port = broker.bound_port()
        self._stopped = False

    @property
    def broker(self) -> HardenedBroker:
        return self._broker

    @property
    def tls_context(self) -> ssl.SSLContext:
        return self._broker.tls_context

    def connected(self) -> dict[str, str]:
        """Identity -> role of every live, admitted session."""
        return {
            identity: conn.admission.role.value
            for identity, conn in self._broker.connections.items()
            if conn.admission is not None
        }

    def sessions(self) -> dict[str, int]:
        """Identity -> serial of the certificate each live, admitted session presented."""
        return {
            identity: conn.admission.serial
            for identity, conn in self._broker.connections.items()
            if conn.admission is not None
        }

    def disconnect(self, device_id: DeviceId | str, reason: str = DROP_OPERATOR) -> bool:
        """Drop the live session of `device_id` now, without its will; False if none.

        The in-process twin of the registry event log, for callers that just revoked or
        suspended the device in this process and need not wait for the next poll.
        """
        return self._broker.drop(str(device_id), reason)

    def poll_revocations(self) -> int:
        """Apply the registry events recorded since the last poll now; returns sessions dropped."""
        return self._watcher.poll_once()

    def metrics_text(self) -> str:
        """Prometheus text exposition: connected identities, refusals by reason, drops."""
        by_role: dict[str, int] = {}
        for role in self.connected().values():
            by_role[role] = by_role.get(role, 0) + 1
        return self._metrics.render(by_role)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._watcher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher_task
        await self._broker.close_connections()
        await self._broker.shutdown()
        if self._close_registry is not None:
            self._close_registry()

    async def __aenter__(self) -> RunningBroker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _open_registry(path: Path | RegistryLocation) -> BrokerRegistry:
    from enroll_server.registry import Registry

    registry: BrokerRegistry = Registry.open(path)
    return registry


async def start_broker(
    config: BrokerConfig,
    *,
    registry: BrokerRegistry | None = None,
    clock: Callable[[], datetime] | None = None,
) -> RunningBroker:
    """Start the mTLS broker and its revocation watcher; the caller must `await .stop()`.

    `registry`: an open registry to share (default: open `config.registry_path`, closed on
    stop). `clock`: the time admission and expiry checks use (default: the system clock).
    """
    check_amqtt_version()
    amqtt_log = logging.getLogger("amqtt")
    if amqtt_log.level == logging.NOTSET:
        # amqtt logs every connection at INFO; at fleet scale that is noise and CPU.
        amqtt_log.setLevel(logging.WARNING)
    now = clock or (lambda: datetime.now(UTC))
    tls = server_tls_context(config.server_cert, config.server_key, config.ca_file)
    close_registry: Callable[[], None] | None = None
    if registry is None:
        registry = _open_registry(config.registry_path)
        close = getattr(registry, "close", None)
        close_registry = close if callable(close) else None
    metrics = BrokerMetrics()
    broker = HardenedBroker(
        _amqtt_config(config),
        gate=AdmissionGate(registry, config.keepalive, now),
        metrics=metrics,
        tls_context=tls,
        connect_timeout=config.connect_timeout,
        handshake_timeout=config.handshake_timeout,
        policy_enabled=config.policy_enabled,
        max_connect_size=config.max_connect_size,
        max_packet_size=config.max_packet_size,
    )
    try:
        await broker.start()
    except AmqttBrokerError as exc:
        if close_registry is not None:
            close_registry()
        cause = exc.__cause__ or exc
        raise BrokerStartError(config.host, config.port, str(cause)) from exc
    watcher = RevocationWatcher(
        registry, broker, now, config.revocation_poll_interval, config.expiry_sweep_interval
    )
    task = asyncio.create_task(watcher.run(), name="fleetpki-broker-revocation")
    running = RunningBroker(broker, watcher, task, metrics, config.host, close_registry)
    log.info("MQTT broker (mTLS) listening on %s:%d", config.host, running.port)
    return running
