"""The decisions behind RabbitMQ's HTTP auth backend (broker.rabbitmq_auth): pure, no server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from enroll_server.broker.rabbitmq_auth import (
    Identity,
    decide_resource,
    decide_topic,
    decide_user,
    decide_vhost,
    identity_of,
    mqtt_topic,
)
from fleetpki.topics import Role

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
DEV = Identity("dev-1", Role.DEVICE)
SVC = Identity("backend", Role.SERVICE)


@dataclass
class Dev:
    device_id: str = "dev-1"
    role: str = "device"
    state: str = "active"


@dataclass
class Cert:
    status: str = "active"
    not_before: datetime = NOW - timedelta(days=1)
    not_after: datetime = NOW + timedelta(days=1)


def test_identity_needs_active_state_and_a_current_certificate() -> None:
    assert identity_of("dev-1", Dev(), [Cert()], NOW) == DEV
    assert identity_of("dev-1", Dev(), [Cert("superseded")], NOW) == DEV
    assert identity_of("dev-1", None, [Cert()], NOW) is None
    assert identity_of("a.b", Dev(), [Cert()], NOW) is None
    for state in ("suspended", "revoked", "provisioned"):
        got = identity_of("dev-1", Dev(state=state), [Cert()], NOW)
        assert got is not None and got.refusal == f"dev-1 is {state}"
    for certs in ([], [Cert("revoked")], [Cert("on_hold")], [Cert(not_after=NOW)]):
        got = identity_of("dev-1", Dev(), certs, NOW)
        assert got is not None and got.refusal == "dev-1 holds no current certificate"


def test_user_refuses_any_password_and_unknown_or_inactive_identities() -> None:
    assert decide_user("dev-1", None, DEV).allowed
    assert decide_user("dev-1", "", DEV).allowed
    # certificate + password: RabbitMQ would log in as the password user; never allow it.
    assert not decide_user("dev-1", "guest", DEV).allowed
    assert not decide_user("guest", None, None).allowed
    assert not decide_user("dev-2", None, DEV).allowed  # identity of another name
    assert decide_user("dev-1", None, Identity("dev-1", Role.DEVICE, "dev-1 is revoked")).why == (
        "dev-1 is revoked"
    )


def test_vhost_binds_the_client_id_to_the_certificate_cn() -> None:
    assert decide_vhost("dev-1", "/", "dev-1", DEV).allowed
    # spoofed client id: denied at CONNECT, so the victim's session is not taken over
    refused = decide_vhost("dev-2", "/", "dev-1", Identity("dev-2", Role.DEVICE))
    assert not refused.allowed and "differs" in refused.why
    assert not decide_vhost("dev-1", "other", "dev-1", DEV).allowed
    assert decide_vhost("dev-1", "/", "dev-1", DEV).body == "allow"
    assert decide_vhost("dev-1", "/", "x", DEV).body == "deny"


def test_resources_are_amq_topic_and_own_queues_only() -> None:
    ok = [
        ("exchange", "amq.topic", "write"),
        ("exchange", "amq.topic", "read"),
        ("queue", "mqtt-subscription-dev-1qos0", "configure"),
        ("queue", "mqtt-subscription-dev-1qos1", "write"),
    ]
    for resource, name, perm in ok:
        assert decide_resource("dev-1", "/", resource, name, perm, DEV).allowed, name
    bad = [
        ("exchange", "amq.topic", "configure"),
        ("exchange", "amq.direct", "write"),
        ("queue", "mqtt-subscription-dev-2qos0", "read"),
        ("queue", "mqtt-subscription-dev-1qos0x", "read"),
    ]
    for resource, name, perm in bad:
        assert not decide_resource("dev-1", "/", resource, name, perm, DEV).allowed, name


def test_routing_keys_map_back_to_mqtt_topics() -> None:
    assert mqtt_topic("devices.dev-1.telemetry") == "devices/dev-1/telemetry"
    assert mqtt_topic("devices.*.telemetry") == "devices/+/telemetry"
    assert mqtt_topic("#") == "#"


@pytest.mark.parametrize(
    ("identity", "permission", "key", "allowed"),
    [
        (DEV, "write", "devices.dev-1.telemetry", True),
        (DEV, "read", "devices.dev-1.commands", True),
        (DEV, "read", "devices.dev-1.#", True),
        (DEV, "write", "devices.dev-2.telemetry", False),  # another device's topic
        (DEV, "read", "devices.dev-2.#", False),
        (DEV, "read", "#", False),  # everything
        (DEV, "read", "devices.*.telemetry", False),  # wildcard over devices
        (SVC, "read", "devices.*.telemetry", True),
        (SVC, "write", "devices.dev-1.commands", True),
        (SVC, "write", "devices.dev-1.telemetry", False),
        (DEV, "configure", "devices.dev-1.x", False),
    ],
)
def test_topics_follow_fleetpki_topics_rules(
    identity: Identity, permission: str, key: str, allowed: bool
) -> None:
    got = decide_topic(
        identity.name, "/", "topic", "amq.topic", permission, key, identity.name, identity
    )
    assert got.allowed is allowed, got.why


def test_topic_refused_for_mismatched_client_id_or_inactive_identity() -> None:
    key = "devices.dev-1.telemetry"
    assert not decide_topic("dev-1", "/", "topic", "amq.topic", "write", key, "x", DEV).allowed
    gone = Identity("dev-1", Role.DEVICE, "dev-1 is suspended")
    assert not decide_topic("dev-1", "/", "topic", "amq.topic", "write", key, "dev-1", gone).allowed
    assert not decide_topic("dev-1", "/", "topic", "amq.fanout", "write", key, None, DEV).allowed
