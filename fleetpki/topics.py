"""MQTT topic names and the per-identity access rules (pure; used by the broker and the agent)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fleetpki.identity import DeviceId


class Role(StrEnum):
    DEVICE = "device"
    SERVICE = "service"


def telemetry_topic(device: DeviceId) -> str:
    return f"devices/{device}/telemetry"


def commands_topic(device: DeviceId) -> str:
    return f"devices/{device}/commands"


class InvalidTopic(ValueError):
    def __init__(self, topic: str, why: str) -> None:
        super().__init__(f"invalid topic {topic!r}: {why}")
        self.topic = topic
        self.why = why


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic name or filter, validated per MQTT 3.1.1 section 4.7."""

    value: str
    is_filter: bool = False

    def __post_init__(self) -> None:
        v = self.value
        if not v:
            raise InvalidTopic(v, "empty")
        if len(v.encode()) > 65535:
            raise InvalidTopic(v, "longer than 65535 bytes")
        if "\x00" in v:
            raise InvalidTopic(v, "contains NUL")
        levels = v.split("/")
        for i, level in enumerate(levels):
            if not self.is_filter and ("+" in level or "#" in level):
                raise InvalidTopic(v, "wildcards are not allowed in a topic name")
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise InvalidTopic(v, "'#' must be a whole last level")
            if "+" in level and level != "+":
                raise InvalidTopic(v, "'+' must be a whole level")

    @property
    def levels(self) -> list[str]:
        return self.value.split("/")


def _filter_within(filter_levels: list[str], allowed: list[str]) -> bool:
    """True if every topic matched by `filter_levels` is matched by the pattern `allowed`.

    `allowed` may contain '+' (one level) and a trailing '#'. A subscription filter is granted
    only when it is a subset of an allowed pattern, so `devices/+/#` is not within
    `devices/dev1/#` although the two overlap.
    """
    for i, want in enumerate(filter_levels):
        if i >= len(allowed):
            return False
        have = allowed[i]
        if have == "#":
            return True
        if want == "#":
            return False
        if have == "+":
            continue
        if want == "+" or want != have:
            return False
    return len(filter_levels) == len(allowed) or (
        len(allowed) == len(filter_levels) + 1 and allowed[-1] == "#"
    )


class Access(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


# Stands for the identity's own id in a rule's pattern (mosquitto's ACL writes it as %u).
OWN_ID = "{id}"


@dataclass(frozen=True, slots=True)
class TopicRule:
    """One grant: identities of `role` may `access` every topic within `pattern`.

    `pattern` is a topic filter ('+' one level, a trailing '#'); an `OWN_ID` level is the
    identity's own id. Both brokers render the same RULES: the embedded one through
    may_publish / may_subscribe, mosquitto through its ACL file (broker/mosquitto_acl.py).
    """

    role: Role
    access: Access
    pattern: str

    def levels(self, identity: str) -> list[str]:
        return [identity if level == OWN_ID else level for level in self.pattern.split("/")]


# DESIGN.md: a device may use only devices/<its id>/#; a service (backend) reads every
# device's telemetry and sends commands. $SYS is closed to devices (MQTT 3.1.1 section 4.7.2:
# '#' does not match '$' topics anyway).
RULES: tuple[TopicRule, ...] = (
    TopicRule(Role.DEVICE, Access.PUBLISH, f"devices/{OWN_ID}/#"),
    TopicRule(Role.DEVICE, Access.SUBSCRIBE, f"devices/{OWN_ID}/#"),
    TopicRule(Role.SERVICE, Access.PUBLISH, "devices/+/commands"),
    TopicRule(Role.SERVICE, Access.SUBSCRIBE, "devices/+/telemetry"),
    TopicRule(Role.SERVICE, Access.SUBSCRIBE, "$SYS/#"),
)


def rules_for(role: Role, access: Access) -> tuple[TopicRule, ...]:
    return tuple(r for r in RULES if r.role is role and r.access is access)


def _allowed(role: Role, access: Access, identity: str, levels: list[str]) -> bool:
    return any(_filter_within(levels, r.levels(identity)) for r in rules_for(role, access))


def may_publish(role: Role, identity: str, topic: str) -> bool:
    """Publish rule (RULES): a device only under devices/<id>/#, a service to devices/+/commands."""
    try:
        t = Topic(topic)
    except InvalidTopic:
        return False
    return _allowed(role, Access.PUBLISH, identity, t.levels)


def may_subscribe(role: Role, identity: str, topic_filter: str) -> bool:
    """Subscribe rule (RULES): a device only under devices/<id>/#, a service to
    devices/+/telemetry and $SYS/#."""
    try:
        t = Topic(topic_filter, is_filter=True)
    except InvalidTopic:
        return False
    return _allowed(role, Access.SUBSCRIBE, identity, t.levels)
