"""The MQTT link: one mTLS session to the broker, a bounded offline queue, reconnects, rotation."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import aiomqtt
from aiomqtt.client import ProtocolVersion
from aiomqtt.exceptions import MqttConnectError

from device_agent.backoff import Backoff
from device_agent.cancel import cancel_all
from device_agent.errors import BrokerRefused
from device_agent.tls import client_context
from fleetpki.identity import DeviceId
from fleetpki.topics import commands_topic, telemetry_topic

log = logging.getLogger("fleetpki.agent")

CommandHandler = Callable[[bytes], Awaitable[None] | None]
# (certificate chain path, key path) of the identity to present on the next connection.
Credentials = Callable[[], tuple[Path, Path]]
# (up, None) when a session starts; (down, why it ended) when it ends.
ConnectionHandler = Callable[[bool, str | None], None]
# (why the broker is unavailable, seconds until the next attempt), before each backoff wait.
RetryHandler = Callable[[str, float], None]
# Called when the broker refuses the device; raises to end the link, else returns True to
# reconnect at once (the device was reinstated after a wait) or False to back off as usual.
RefusalHandler = Callable[[BrokerRefused], Awaitable[bool]]
# Called with a telemetry message's bytes once the broker acknowledged it (PUBACK): the
# delivery receipt (a message may be acknowledged twice if a PUBACK was lost on the way).
DeliveredHandler = Callable[[bytes], None]

# MQTT 3.1.1 section 3.2.2.3: CONNACK 4 = bad user name or password, 5 = not authorized.
# paho 2 reports them as MQTT 5 reason codes 134 and 135.
_REFUSED = {
    4: "bad user name or password",
    5: "not authorized",
    134: "bad user name or password",
    135: "not authorized",
}
# TLS alerts by which a broker says the client certificate itself is revoked (RFC 8446 6.2).
_REVOKED_ALERTS = ("CERTIFICATE_REVOKED", "certificate revoked")


class _SessionLog(logging.Logger):
    """paho's logger for one connection attempt, remembering a revoked-certificate alert.

    With TLS 1.3 the broker judges the client certificate after the client's handshake has
    completed (RFC 8446 4.4.2.4), so its alert reaches paho only as a failed read that paho
    logs and aiomqtt turns into a plain timeout. Listening to paho's own log is the one public
    way to see why the session died.
    """

    def __init__(self) -> None:
        super().__init__("fleetpki.agent.mqtt")
        self.parent = logging.getLogger("fleetpki.agent")
        self.revoked = False

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            text = str(msg) % args if args else str(msg)
            if any(alert in text for alert in _REVOKED_ALERTS):
                self.revoked = True
        super().log(level, msg, *args, **kwargs)


def _connack_code(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    if rc is None:
        return None
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


def _read_failure(task: asyncio.Task[Any]) -> None:
    """A session task's done callback: read its failure as it ends. A lost connection fails
    the pump and the listener in the same turn, or the second while it is being cancelled
    (aiomqtt may turn the cancel into its own "Disconnected" error), or after `_serve` itself
    was cancelled twice in a stop; whoever looks at the outcome, asyncio must not log "Task
    exception was never retrieved" for any of them."""
    if not task.cancelled():
        task.exception()


class MqttLink:
    """Keeps one device's MQTT session up; survives broker restarts; stops only when refused.

    Telemetry goes through a bounded queue: while offline the oldest messages are dropped (and
    counted) so memory stays flat however long the outage. A message leaves the queue only
    after its PUBACK (QoS 1, MQTT 3.1.1 section 4.3.2): delivery is at-least-once across
    reconnects and certificate rotations.
    """

    def __init__(
        self,
        device_id: DeviceId,
        host: str,
        port: int,
        trust_anchor: Path,
        credentials: Credentials,
        *,
        queue_size: int = 1000,
        keepalive: int = 30,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        on_command: CommandHandler | None = None,
        on_connection: ConnectionHandler | None = None,
        on_retry: RetryHandler | None = None,
        on_refused: RefusalHandler | None = None,
        on_delivered: DeliveredHandler | None = None,
        timeout: float = 10.0,
        brokers: Sequence[tuple[str, int]] = (),
    ) -> None:
        """`brokers`: several nodes' brokers in the order to try them (host, port: the first);
        a connection that cannot be made or is lost moves on to the next at once, and only
        when every one has failed in a row does the backoff wait. A refusal (CONNACK, a
        revoked certificate's TLS alert) is the fleet's word whichever node said it: no
        moving on."""
        self.device_id = device_id
        self.brokers = tuple(brokers) or ((host, port),)
        self._broker = 0
        self.host, self.port = self.brokers[0]
        self.trust_anchor = trust_anchor
        self.credentials = credentials
        self.keepalive = keepalive
        self.backoff = backoff or Backoff(base=1.0, factor=2.0, cap=60.0)
        self.rng = rng or random.Random()
        self.on_command = on_command
        self.on_connection = on_connection
        self.on_retry = on_retry
        self.on_refused = on_refused
        self.on_delivered = on_delivered
        self._receipt_failed = False
        self.timeout = timeout
        self.telemetry_topic = telemetry_topic(device_id)
        self.commands_topic = commands_topic(device_id)
        self._queue: deque[tuple[int, bytes]] = deque(maxlen=queue_size)
        self._seq = itertools.count()
        self._nonempty = asyncio.Event()
        self._rotate = asyncio.Event()
        self.connected = asyncio.Event()
        self.connections = 0
        self.published = 0
        self.dropped = 0

    # -- producer side ---------------------------------------------------------------------
    def enqueue(self, payload: bytes) -> None:
        """Queue one telemetry message; drops the oldest when the queue is full."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning(
                    "%s: offline queue full (%d); dropped %d oldest telemetry messages so far",
                    self.device_id,
                    self._queue.maxlen,
                    self.dropped,
                )
        self._queue.append((next(self._seq), payload))
        self._nonempty.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def rotate(self) -> None:
        """Reconnect now with the credentials of `credentials()` (after a renewal)."""
        self._rotate.set()

    # -- connection loop -------------------------------------------------------------------
    async def run(self) -> NoReturn:
        """Connect, serve, reconnect with backoff. When refused: raises BrokerRefused, or,
        with `on_refused`, lets it decide (stop, wait, or back off as usual)."""
        attempt = 0
        failed_in_a_row = 0  # brokers that failed since one last worked
        while True:
            self._rotate.clear()
            why = "stopped"  # unless set below: cancelled, the agent is stopping
            try:
                await self._connect_and_serve()
                failed_in_a_row = 0
                why = "reconnecting with the renewed certificate"
                attempt = 0  # a clean rotation: reconnect at once
                continue
            except BrokerRefused as exc:
                why = str(exc)
                if self.on_refused is None:
                    raise
                if await self.on_refused(exc):
                    attempt = 0
                    continue  # reinstated after a wait: reconnect now
            except (aiomqtt.MqttError, OSError, ssl.SSLError, TimeoutError) as exc:
                if self.connected.is_set():
                    attempt = 0  # the session was up: start the backoff afresh
                    failed_in_a_row = 0
                why = str(exc) or type(exc).__name__
                if len(self.brokers) > 1:
                    failed_in_a_row += 1
                    self._broker = (self._broker + 1) % len(self.brokers)
                    previous = f"{self.host}:{self.port}"
                    self.host, self.port = self.brokers[self._broker]
                    if failed_in_a_row < len(self.brokers):
                        log.warning(
                            "%s: MQTT %s unavailable (%s); trying %s:%d",
                            self.device_id, previous, why, self.host, self.port,
                        )  # fmt: skip
                        continue  # (finally: below reports the lost session)
                    failed_in_a_row = 0
            finally:
                if self.connected.is_set():
                    self.connected.clear()
                    if self.on_connection:
                        self.on_connection(False, why)
            delay = self.backoff.delay(attempt, self.rng)
            attempt += 1
            if self.on_retry:
                self.on_retry(why, delay)
            log.warning(
                "%s: MQTT %s:%d unavailable (%s); reconnecting in %.1f s",
                self.device_id,
                self.host,
                self.port,
                why,
                delay,
            )
            try:
                async with asyncio.timeout(delay):
                    await self._rotate.wait()  # new credentials cut the wait short
            except TimeoutError:
                pass

    def _client(self, session_log: logging.Logger) -> aiomqtt.Client:
        cert_path, key_path = self.credentials()
        ctx = client_context(self.trust_anchor, cert_path, key_path)
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.device_id.value,
            protocol=ProtocolVersion.V311,
            tls_context=ctx,
            keepalive=self.keepalive,
            clean_session=True,
            timeout=self.timeout,
            logger=session_log,
        )

    async def _connect_and_serve(self) -> None:
        session_log = _SessionLog()
        client = self._client(session_log)
        try:
            # The connect timeout guards against a broker that accepts TLS but never answers
            # CONNECT (or drops a TLS 1.3 client whose certificate it rejects after the
            # handshake, which paho only notices as silence).
            async with asyncio.timeout(self.timeout + 5):
                await client.__aenter__()
        except MqttConnectError as exc:
            code = _connack_code(exc)
            if code in _REFUSED:
                raise BrokerRefused(self.host, self.port, _REFUSED[code], code) from exc
            raise
        except (aiomqtt.MqttError, TimeoutError) as exc:
            if session_log.revoked or any(alert in str(exc) for alert in _REVOKED_ALERTS):
                raise BrokerRefused(
                    self.host, self.port, "certificate revoked (TLS alert)"
                ) from exc
            raise
        try:
            self.connections += 1
            self.connected.set()
            if self.on_connection:
                self.on_connection(True, None)
            log.info(
                "%s: connected to MQTT %s:%d (%d queued)",
                self.device_id,
                self.host,
                self.port,
                len(self._queue),
            )
            await client.subscribe(self.commands_topic, qos=1)
            await self._serve(client)
        finally:
            try:
                async with asyncio.timeout(self.timeout):
                    await client.__aexit__(None, None, None)
            except (aiomqtt.MqttError, TimeoutError, OSError):
                pass  # already gone; nothing to tidy

    async def _serve(self, client: aiomqtt.Client) -> None:
        pump = asyncio.create_task(self._pump(client))
        listen = asyncio.create_task(self._listen(client))
        rotate = asyncio.create_task(self._rotate.wait())
        tasks = {pump, listen, rotate}
        for task in tasks:
            task.add_done_callback(_read_failure)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_all(tasks)
        # Re-raise the first MqttError, which ends the session.
        for task in done:
            if task is not rotate:
                task.result()
        if rotate in done:
            log.info("%s: reconnecting with the renewed certificate", self.device_id)

    async def _pump(self, client: aiomqtt.Client) -> None:
        while True:
            while not self._queue:
                self._nonempty.clear()
                await self._nonempty.wait()
            seq, payload = self._queue[0]
            await client.publish(self.telemetry_topic, payload, qos=1, timeout=self.timeout)
            # Overflow may have dropped it meanwhile; pop only what was acknowledged.
            if self._queue and self._queue[0][0] == seq:
                self._queue.popleft()
            self.published += 1
            if self.on_delivered is not None:
                self._receipt(payload)

    def _receipt(self, payload: bytes) -> None:
        """The delivery receipt; a failing handler is the application's bug, and must not
        end the session (logged once)."""
        assert self.on_delivered is not None
        try:
            self.on_delivered(payload)
        except Exception:
            if not self._receipt_failed:
                self._receipt_failed = True
                log.exception("%s: the on_delivered handler failed (logged once)", self.device_id)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            if self.on_command is None:
                log.info("%s: command received (%d bytes), no handler", self.device_id, len(data))
                continue
            try:
                result = self.on_command(data)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("%s: command handler failed", self.device_id)
