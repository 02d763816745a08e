"""RabbitMQ's HTTP auth backend answered by `fleetpki serve` on its admin listener."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime

from enroll_server.broker.rabbitmq_auth_routes import ensure_secret, secret_path
from fleetpki.identity import DeviceId
from tests.est_client import Reply, request
from tests.integration.test_est import enroll
from tests.live_server import LiveServer

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def ask(server: LiveServer, secret: str, path: str, **params: str) -> Reply:
    body = urllib.parse.urlencode(params).encode()
    url = f"{server.admin_url}/rabbitmq/{secret}/{path}"
    return request(url, server.client_ssl(), "POST", body, FORM)


def test_registry_answers_rabbitmq_behind_the_secret(live_server: LiveServer) -> None:
    secret = ensure_secret(live_server.layout.root, "s3cret-for-rabbitmq-0123456789")
    assert secret_path(live_server.layout.root).stat().st_mode & 0o777 == 0o600
    token = live_server.mint_device("dev-1")
    assert enroll(live_server, "dev-1", token).status == 200
    live_server.mint_device("dev-2")  # registered, never enrolled: no certificate

    assert ask(live_server, secret, "user", username="dev-1").text == "allow"
    # certificate + password (RabbitMQ would log in as the password's user): refused
    assert ask(live_server, secret, "user", username="dev-1", password="guest").text == "deny"
    assert ask(live_server, secret, "user", username="guest", password="guest").text == "deny"
    assert ask(live_server, secret, "user", username="dev-2").text == "deny"
    # spoofed client id: refused at the vhost check
    vhost = {"username": "dev-1", "vhost": "/"}
    assert ask(live_server, secret, "vhost", client_id="dev-1", **vhost).text == "allow"
    assert ask(live_server, secret, "vhost", client_id="dev-9", **vhost).text == "deny"
    topic = {
        "username": "dev-1",
        "vhost": "/",
        "resource": "topic",
        "name": "amq.topic",
        "variable_map.client_id": "dev-1",
    }
    own = ask(
        live_server, secret, "topic", permission="write", routing_key="devices.dev-1.t", **topic
    )
    assert own.text == "allow"
    other = ask(
        live_server, secret, "topic", permission="write", routing_key="devices.dev-2.t", **topic
    )
    assert other.text == "deny"
    everything = ask(live_server, secret, "topic", permission="read", routing_key="#", **topic)
    assert everything.text == "deny"
    res = {"username": "dev-1", "vhost": "/", "resource": "exchange", "name": "amq.topic"}
    assert ask(live_server, secret, "resource", permission="write", **res).text == "allow"
    assert ask(live_server, secret, "resource", permission="configure", **res).text == "deny"

    # suspended in the registry: every check says no at once (no cache in fleetpki)
    now = datetime.now(UTC)
    live_server.registry.suspend_device(DeviceId("dev-1"), now=now, actor="test")
    assert ask(live_server, secret, "user", username="dev-1").text == "deny"
    own = ask(
        live_server, secret, "topic", permission="write", routing_key="devices.dev-1.t", **topic
    )
    assert own.text == "deny"

    # a wrong secret is an unknown path; so is any secret before one exists
    assert ask(live_server, "wrong", "user", username="dev-1").status == 404
    secret_path(live_server.layout.root).unlink()
    assert ask(live_server, secret, "user", username="dev-1").status == 404
