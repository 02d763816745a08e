"""Agents that fail over: bundles naming several nodes (`batch create --est-url/--broker`),
an agent that moves on from a node that is down and stops when any node refuses it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device_agent.agent import AgentState
from device_agent.config import load_config, parse_config, spread
from device_agent.errors import ConfigError
from device_agent.exit_codes import ExitCode
from enroll_server.cli.app import app
from fleetpki.identity import DeviceId
from tests.integration.test_agent_e2e import make_agent, until
from tests.live_server import LiveServer, start_live_server

AGENT_TOML = """[device]
id = "dev-1"
[enroll]
server = {server}
[mqtt]
{mqtt}
"""


def test_several_servers_and_brokers_in_a_stable_order_per_device(tmp_path: Path) -> None:
    text = AGENT_TOML.format(
        server='["https://a.example:8443", "https://b.example:8443", "https://c.example"]',
        mqtt='brokers = ["a.example:8883", "b.example", "[::1]:1883"]',
    )
    cfg = parse_config(text, tmp_path / "agent.toml")
    assert {s.url for s in cfg.est_servers} == {
        "https://a.example:8443", "https://b.example:8443", "https://c.example"
    }  # fmt: skip
    assert set(cfg.mqtt_brokers) == {("a.example", 8883), ("b.example", 8883), ("::1", 1883)}
    assert cfg.est_servers == parse_config(text, tmp_path / "agent.toml").est_servers
    # Another device spreads elsewhere: over 50 devices every broker comes first for some.
    firsts = {spread(cfg.brokers, f"dev-{i}", lambda b: f"{b[0]}:{b[1]}")[0] for i in range(50)}
    assert firsts == set(cfg.brokers)
    # The one-server form still works; bad entries are named.
    one = parse_config(
        AGENT_TOML.format(server='"https://a.example"', mqtt='host = "a.example"'), tmp_path / "x"
    )
    assert len(one.est_servers) == 1 and one.mqtt_brokers == (("a.example", 8883),)
    for server, mqtt, key in (
        ('["https://a.example", "http://b.example"]', 'host = "a"', "enroll.server"),
        ("[]", 'host = "a"', "enroll.server"),
        ('"https://a.example"', 'brokers = ["a.example:99999"]', "mqtt.brokers"),
        ('"https://a.example"', 'brokers = ["mqtt://a.example:1"]', "mqtt.brokers"),
        ('"https://a.example"', "brokers = []", "mqtt.brokers"),
    ):
        with pytest.raises(ConfigError) as refused:
            parse_config(AGENT_TOML.format(server=server, mqtt=mqtt), tmp_path / "agent.toml")
        assert refused.value.key is not None and refused.value.key.startswith(key), refused.value


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers with their brokers on one home (one CA, one registry)."""
    a = start_live_server(tmp_path / "home", broker=True)
    try:
        b = start_live_server(tmp_path / "home", broker=True)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def _batch(home: Path, out: Path, *nodes: LiveServer, extra: tuple[str, ...] = ()) -> int:
    args = ["batch", "create", "--home", str(home), "--count", "1", "--prefix", "fo-",
            "--out", str(out), *extra]  # fmt: skip
    for node in nodes:
        args += ["--est-url", f"https://localhost:{node.handle.est_port}"]
        args += ["--broker", f"localhost:{node.mqtt_port}"]
    result = CliRunner().invoke(app, args)
    return result.exit_code


async def test_agent_moves_on_from_a_node_that_is_down_and_stops_when_refused(
    two_nodes: tuple[LiveServer, LiveServer], tmp_path: Path
) -> None:
    a, b = two_nodes
    assert _batch(a.layout.root, tmp_path / "lot", a, b) == 0
    config = tmp_path / "lot" / "fo-000001" / "agent.toml"
    cfg = load_config(config)
    assert len(cfg.est_servers) == 2 and len(cfg.mqtt_brokers) == 2
    # Take down the node this device tries first: it must enroll and connect through the other.
    first_port = cfg.est_servers[0].port
    down, up = (a, b) if first_port == a.handle.est_port else (b, a)
    down.stop()
    agent = make_agent(config)
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.state is AgentState.CONNECTED, 30, "connected via the other")
        assert agent.link is not None and agent.link.port == up.mqtt_port
        assert len(up.registry.certificates_of(DeviceId("fo-000001"))) == 1
        # Refused by the node it is on: the device stops, it does not shop for another node.
        up.registry.revoke_device(
            DeviceId("fo-000001"), reason="key-compromise", now=datetime.now(UTC), actor="test"
        )
        code = await asyncio.wait_for(task, 30)
    finally:
        agent.stop()
    assert code == ExitCode.REFUSED


def test_batch_create_refuses_a_bad_est_url_or_broker_and_creates_nothing(
    two_nodes: tuple[LiveServer, LiveServer], tmp_path: Path
) -> None:
    a, _ = two_nodes
    for extra in (("--est-url", "http://plain.example"), ("--broker", "host:0")):
        result = CliRunner().invoke(
            app,
            ["batch", "create", "--home", str(a.layout.root), "--count", "1", "--prefix",
             "bad-", "--out", str(tmp_path / "bad"), *extra],
        )  # fmt: skip
        assert result.exit_code == 2 and extra[0] in result.output, result.output
        assert not (tmp_path / "bad").exists()
        assert a.registry.get_device(DeviceId("bad-000001")) is None
