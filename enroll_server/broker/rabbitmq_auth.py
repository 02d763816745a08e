"""RabbitMQ's HTTP auth backend answered from the registry: the pure allow/deny decisions.

rabbitmq_auth_backend_http (RabbitMQ 3.10) asks four questions; the HTTP edge
(broker/rabbitmq_auth_routes.py) decodes them and calls these functions:
- user: `username` (with ssl_cert_login, the certificate CN) and `password` (absent for a
  certificate login). Any password is refused: tried on 3.10.8, a username/password in the
  CONNECT beats the certificate, so a password login would let one device act as another.
- vhost: `username`, `vhost`, `client_id` (the MQTT client id). Denied when client id != CN:
  RabbitMQ registers the client id (and kicks its holder) only after this check, so the
  duplicate-id takeover of another device's session is refused at CONNECT.
- resource: `username`, `resource` (exchange|queue), `name`, `permission`. Only what the MQTT
  plugin needs: the topic exchange amq.topic and the identity's own subscription queues.
- topic: `username`, `routing_key`, `permission` (write = publish, read = subscribe),
  `variable_map.client_id`. The MQTT plugin maps '/' to '.' (and '+' to '*'); the routing key
  is mapped back and judged by fleetpki.topics (the one topic ACL).
Each check also requires the identity to be active in the registry with a current
certificate: a revoked or suspended device is refused at every step, not only at connect.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from enroll_server.broker.policy import DeviceView, value_text
from fleetpki.identity import is_valid_id
from fleetpki.topics import Role, may_publish, may_subscribe

# rabbitmq-sync's management login: no device id nor DNS name starts with "_", so no certificate
# of our CA carries this CN.
SYNC_USERNAME = "_fleetpki-sync"
ALLOW = "allow"
DENY = "deny"
VHOST = "/"
MQTT_EXCHANGE = "amq.topic"
# rabbit_mqtt_processor: the queue of a client's subscriptions is
# "mqtt-subscription-" ++ ClientId ++ "qos0" | "qos1".
SUBSCRIPTION_QUEUE_PREFIX = "mqtt-subscription-"
SUBSCRIPTION_QUEUE_SUFFIXES = ("qos0", "qos1")


class CertificateView(Protocol):
    """What the decision needs of a registry certificate record (CertificateRecord)."""

    @property
    def status(self) -> object: ...
    @property
    def not_before(self) -> datetime: ...
    @property
    def not_after(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """An answer to RabbitMQ: allowed or not, and why (for the log, never for RabbitMQ)."""

    allowed: bool
    why: str
    tags: tuple[str, ...] = ()

    @property
    def body(self) -> str:
        """What the HTTP backend reads: "deny", or "allow" and the user's tags (only
        rabbitmq-sync has one)."""
        if not self.allowed:
            return DENY
        return " ".join((ALLOW, *self.tags))


def _deny(why: str) -> Decision:
    return Decision(False, why)


@dataclass(frozen=True, slots=True)
class Identity:
    """A registered identity as the checks see it: its id and role, and whether it may be
    connected now (None) or why not."""

    name: str
    role: Role
    refusal: str | None = None


def identity_of(
    name: str,
    device: DeviceView | None,
    certificates: Iterable[CertificateView],
    now: datetime,
) -> Identity | None:
    """Who `name` is in the registry (None: not registered, or not an id at all).

    May connect only when the identity is active and holds a certificate that is active (or the
    superseded fallback of an unused renewal, as broker.policy admits) and valid at `now`.
    The TLS listener has already checked the presented certificate's chain and the CRL.
    """
    if not is_valid_id(name) or device is None:
        return None
    role = Role(value_text(device.role))
    state = value_text(device.state)
    if state != "active":
        return Identity(name, role, f"{name} is {state}")
    current = any(
        value_text(c.status) in ("active", "superseded") and c.not_before <= now < c.not_after
        for c in certificates
    )
    if not current:
        return Identity(name, role, f"{name} holds no current certificate")
    return Identity(name, role)


def _admitted(username: str, identity: Identity | None) -> Decision | None:
    if identity is None or identity.name != username:
        return _deny(f"{username!r} is not a registered identity")
    if identity.refusal is not None:
        return _deny(identity.refusal)
    return None


def decide_user(username: str, password: str | None, identity: Identity | None) -> Decision:
    """A login: only a certificate login (no password) of an identity that may connect."""
    if password:
        return _deny(f"{username!r} sent a password: only certificate logins are accepted")
    return _admitted(username, identity) or Decision(True, f"{username} logged in")


def decide_sync_user(password: str | None, expected: str | None) -> Decision:
    """rabbitmq-sync's management login (SYNC_USERNAME): its password from the home's secret
    file. It gets the administrator tag (closing another user's connections needs it) and no
    vhost (decide_vhost refuses it), so it cannot use MQTT."""
    if expected is None or password is None:
        return _deny(f"{SYNC_USERNAME} has no password set up")
    if not hmac.compare_digest(password.encode(), expected.encode()):
        return _deny(f"{SYNC_USERNAME}: wrong password")
    return Decision(True, f"{SYNC_USERNAME} logged in", tags=("administrator",))


def decide_vhost(
    username: str, vhost: str, client_id: str | None, identity: Identity | None
) -> Decision:
    """The vhost check at CONNECT: the client id must be the certificate CN."""
    if vhost != VHOST:
        return _deny(f"{username!r} asked for vhost {vhost!r}")
    if client_id is not None and client_id != username:
        return _deny(f"client id {client_id!r} differs from the certificate CN {username!r}")
    return _admitted(username, identity) or Decision(True, f"{username} on vhost {vhost}")


def _own_queue(username: str, name: str) -> bool:
    return any(
        name == f"{SUBSCRIPTION_QUEUE_PREFIX}{username}{s}" for s in SUBSCRIPTION_QUEUE_SUFFIXES
    )


def decide_resource(
    username: str,
    vhost: str,
    resource: str,
    name: str,
    permission: str,
    identity: Identity | None,
) -> Decision:
    """Exchange/queue access: amq.topic (read to bind, write to publish, never configure) and
    the identity's own subscription queues; nothing else."""
    refused = _admitted(username, identity)
    if refused is not None:
        return refused
    if vhost != VHOST:
        return _deny(f"{username!r} asked for vhost {vhost!r}")
    if resource == "exchange" and name == MQTT_EXCHANGE and permission in ("read", "write"):
        return Decision(True, f"{username} may {permission} {name}")
    if resource == "queue" and _own_queue(username, name):
        return Decision(True, f"{username} may {permission} its queue {name}")
    return _deny(f"{username!r} may not {permission} {resource} {name!r}")


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic (filter) a routing key of RabbitMQ's MQTT plugin stands for: the plugin
    maps '/' to '.' and '+' to '*' (rabbit_mqtt_util:mqtt_to_amqp); device ids and the
    topic levels of fleetpki.topics hold neither '.' nor '*'."""
    return "/".join("+" if level == "*" else level for level in routing_key.split("."))


def decide_topic(
    username: str,
    vhost: str,
    resource: str,
    name: str,
    permission: str,
    routing_key: str,
    client_id: str | None,
    identity: Identity | None,
) -> Decision:
    """A publish (write) or subscribe (read) on amq.topic, judged by fleetpki.topics RULES."""
    refused = _admitted(username, identity)
    if refused is not None:
        return refused
    assert identity is not None
    if vhost != VHOST or resource != "topic" or name != MQTT_EXCHANGE:
        return _deny(f"{username!r} asked for {resource} {name!r} on vhost {vhost!r}")
    if client_id is not None and client_id != username:
        return _deny(f"client id {client_id!r} differs from the certificate CN {username!r}")
    topic = mqtt_topic(routing_key)
    if permission == "write":
        ok = may_publish(identity.role, username, topic)
    elif permission == "read":
        ok = may_subscribe(identity.role, username, topic)
    else:
        return _deny(f"unknown topic permission {permission!r}")
    verb = "publish to" if permission == "write" else "subscribe to"
    if ok:
        return Decision(True, f"{username} may {verb} {topic}")
    return _deny(f"{username!r} may not {verb} {topic!r}")
