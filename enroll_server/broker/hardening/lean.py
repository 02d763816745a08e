"""Light stand-ins for the objects amqtt builds per connection (session states, queues)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Generic, TypeVar

from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

from enroll_server.broker.errors import BadConnect

T = TypeVar("T")


class _SessionState:
    """amqtt's Session states (new -> connected <-> disconnected) without `transitions`.

    amqtt builds a `transitions.Machine` for every session: ~16 KB and a noticeable share of
    the CPU of a connect. The broker uses only `state`, `connect()`, `disconnect()` and
    `is_connected()`, with the same rule: connecting an already connected session fails.
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> None:
        if self.state == "connected":
            raise MachineError("session is already connected")
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_connected(self) -> bool:
        return self.state == "connected"


class LeanQueue(Generic[T]):
    """The unbounded subset of asyncio.Queue amqtt uses, allocating nothing until used.

    asyncio.Queue builds four deques (items, getters, putters, and its `_finished` Event's
    waiters) of ~600 bytes each up front; amqtt keeps four queues per connection (two in the
    session, two in the protocol handler), most of them empty forever: ~13 KB per idle
    device. Semantics follow asyncio.Queue.get/put for one event loop, cancellation included.
    """

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: collections.deque[T] | None = None
        # Almost always zero or one waiter: a list is ~70 bytes where a deque is ~600.
        self._getters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        self._wake_next()

    async def put(self, item: T) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    async def get(self) -> T:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    if self._getters is not None:
                        self._getters.remove(waiter)
                if self._items and not waiter.cancelled():
                    self._wake_next()  # we were woken but leave: pass the item on
                raise
        return self.get_nowait()

    def _wake_next(self) -> None:
        while self._getters:
            waiter = self._getters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break
        if not self._getters:
            self._getters = None


class LeanSession(Session):
    """An amqtt Session whose `transitions` is a `_SessionState` and whose queues are lean."""

    def __init__(self) -> None:
        super().__init__()
        self.retained_messages: LeanQueue[Any] = LeanQueue()
        self.delivered_message_queue: LeanQueue[Any] = LeanQueue()

    def _init_states(self) -> None:
        self.transitions = _SessionState(self)


class LeanProtocolHandler(BrokerProtocolHandler):
    """amqtt's broker protocol handler with lean subscription queues."""

    def __init__(self, plugins_manager: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(plugins_manager, loop=loop)
        self._pending_subscriptions: LeanQueue[Any] = LeanQueue()
        self._pending_unsubscriptions: LeanQueue[Any] = LeanQueue()


def session_from_connect(connect: ConnectPacket, peer: tuple[str, int]) -> LeanSession:
    """The checks and fields of amqtt's `BrokerProtocolHandler.init_from_connect`.

    Protocol name and level were screened on the raw frame (connect_frame.screen_protocol).
    Raises BadConnect for a packet MQTT 3.1.1 section 3.1 forbids.
    """
    header = connect.variable_header
    payload = connect.payload
    if header is None or payload is None or payload.client_id is None:
        raise BadConnect("CONNECT without variable header or client identifier")
    if header.reserved_flag:
        raise BadConnect("[MQTT-3.1.2-3] CONNECT reserved flag is set")
    if header.will_flag and (payload.will_topic is None or payload.will_message is None):
        raise BadConnect("[MQTT-3.1.2-9] will flag set without will topic and message")
    if header.password_flag and not header.username_flag:
        raise BadConnect("[MQTT-3.1.2-22] password flag set without user name flag")
    session = LeanSession()
    session.client_id = payload.client_id
    session.clean_session = header.clean_session_flag
    session.will_flag = header.will_flag
    session.will_retain = header.will_retain_flag
    session.will_qos = header.will_qos
    session.will_topic = payload.will_topic
    session.will_message = payload.will_message
    session.username = payload.username
    # The password is not kept: identities are certificates, and a session object may be
    # logged or pickled (amqtt's persistence plugin).
    session.password = None
    session.remote_address, session.remote_port = peer
    session.keep_alive = max(header.keep_alive, 0)
    return session
