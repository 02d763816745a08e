"""AgentEvent: what an Agent reports to its `on_event` callback as its lifecycle unfolds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class EventKind(StrEnum):
    ENROLLED = "enrolled"  # serial: a (re-)bootstrap stored a certificate
    RENEWED = "renewed"  # old_serial -> serial: simplereenroll stored a new certificate
    CONNECTED = "connected"  # the broker accepted the MQTT session
    DISCONNECTED = "disconnected"  # reason: why the session ended
    STATE = "state"  # state: the agent's new AgentState
    RETRY = "retry"  # what ("enroll", "renew", "mqtt", "suspended") failed, why, and the delay


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """One lifecycle event. Only the fields of its kind are set; `at` is `time.monotonic()`
    when it happened (monotonic, so intervals between events never jump with the wall clock).
    Build events with the named constructors, which set exactly their kind's fields."""

    kind: EventKind
    serial: str | None = None  # hex, as in the keystore and `fleetpki-agent status`
    old_serial: str | None = None
    reason: str | None = None
    state: str | None = None
    what: str | None = None
    why: str | None = None
    delay: float | None = None
    at: float = field(default_factory=time.monotonic)

    @classmethod
    def enrolled(cls, serial: str) -> AgentEvent:
        return cls(EventKind.ENROLLED, serial=serial)

    @classmethod
    def renewed(cls, old_serial: str, new_serial: str) -> AgentEvent:
        return cls(EventKind.RENEWED, serial=new_serial, old_serial=old_serial)

    @classmethod
    def connected(cls) -> AgentEvent:
        return cls(EventKind.CONNECTED)

    @classmethod
    def disconnected(cls, reason: str) -> AgentEvent:
        return cls(EventKind.DISCONNECTED, reason=reason)

    @classmethod
    def state_changed(cls, state: str) -> AgentEvent:
        return cls(EventKind.STATE, state=state)

    @classmethod
    def retry(cls, what: str, why: str, delay: float) -> AgentEvent:
        return cls(EventKind.RETRY, what=what, why=why, delay=delay)


# The callback: called synchronously in the agent's event loop, so it must not block.
EventHandler = Callable[[AgentEvent], None]
