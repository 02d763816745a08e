"""Suspension is reversible, revocation is not: the real agent against the real service and
its embedded broker waits out a suspension by itself and stops for good on revocation."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from device_agent.agent import Agent, AgentState
from device_agent.backoff import Backoff
from device_agent.config import load_config
from device_agent.exit_codes import ExitCode
from fleetpki.identity import DeviceId
from tests.integration.test_agent_e2e import (
    DEV,
    FAST_EST,
    FAST_MQTT,
    _short_server,
    bundle_for,
    bundle_for_server_only,
    until,
    write_bundle,
)
from tests.integration.test_revocation_mosquitto import Broker, _start
from tests.live_server import LiveServer, start_live_server

REPO = Path(__file__).resolve().parents[2]
FAST_SUSPENDED = Backoff(base=0.2, factor=2.0, cap=0.5)


def agent_for(config: Path, **kw: Any) -> Agent:
    return Agent(
        load_config(config),
        est_backoff=FAST_EST,
        mqtt_backoff=FAST_MQTT,
        suspended_backoff=FAST_SUSPENDED,
        **kw,
    )


def now() -> datetime:
    return datetime.now(UTC)


def agent_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`fleetpki-agent ARGS` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "device_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_agent_process_waits_while_suspended_resumes_by_itself_and_stops_when_revoked(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    """`fleetpki-agent run` as systemd runs it: suspend -> it waits (state suspended, the
    process alive), resume -> it reconnects by itself, revoke -> exit 3, state revoked."""
    config = bundle_for(live_stack, tmp_path)
    text = config.read_text().replace("[enroll]\n", "[enroll]\nsuspended_retry_max = 1\n")
    config.write_text(text)
    status_file = config.parent / "state" / "status.json"

    def status() -> dict[str, Any]:
        try:
            value = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def cli_status() -> dict[str, Any]:
        report: dict[str, Any] = json.loads(agent_cli("status", "-c", str(config), "--json").stdout)
        return report

    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: status().get("state") == "connected", 30, "first connection")
        first = status()["last_connected"]

        live_stack.registry.suspend_device(DeviceId(DEV), now=now(), actor="test")
        wait_for(lambda: status().get("state") == "suspended", 20, "state suspended")
        time.sleep(3)  # several checks at the 1 s cap: still waiting, not exited
        assert proc.poll() is None
        assert status()["state"] == "suspended"
        report = cli_status()
        assert report["agent_state"] == "suspended" and report["agent_running"] is True
        assert "suspended" in report["last_error"]

        live_stack.registry.resume_device(DeviceId(DEV), now=now(), actor="test")
        wait_for(
            lambda: status().get("state") == "connected" and status()["last_connected"] != first,
            20,
            "reconnected after resume",
        )
        assert proc.poll() is None

        live_stack.registry.revoke_device(
            DeviceId(DEV), reason="key-compromise", now=now(), actor="test"
        )
        assert proc.wait(30) == ExitCode.REFUSED
        assert status()["state"] == "revoked"
        report = cli_status()
        assert report["agent_state"] == "revoked" and report["agent_running"] is False
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


async def test_suspended_before_enrolling_waits_then_enrolls(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    config = bundle_for(live_stack, tmp_path)
    live_stack.registry.suspend_device(DeviceId(DEV), now=now(), actor="test")
    # A one-shot `enroll` does not wait: it says so and exits 3.
    once = agent_for(config)
    assert await once.enroll() == ExitCode.REFUSED
    assert once.state is AgentState.SUSPENDED
    assert (config.parent / "token").exists()  # nothing spent
    # `run` waits, and enrolls once the operator resumes the device.
    agent = agent_for(config)
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.state is AgentState.SUSPENDED, 15, "suspended")
        await asyncio.sleep(1.5)
        assert not task.done()
        live_stack.registry.resume_device(DeviceId(DEV), now=now(), actor="test")
        await until(lambda: agent.state is AgentState.CONNECTED, 20, "connected")
        assert agent.identity is not None
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 15) == ExitCode.OK


async def test_suspended_at_renewal_waits_then_renews(tmp_path: Path) -> None:
    """No broker here: renewal (simplereenroll) alone meets the suspension."""
    server = _short_server(tmp_path, 6)
    try:
        config = bundle_for_server_only(server, tmp_path)
        agent = agent_for(config)
        task = asyncio.create_task(agent.run())
        await until(lambda: agent.identity is not None, 15, "enrolled")
        server.registry.suspend_device(DeviceId(DEV), now=now(), actor="test")
        await until(lambda: agent.state is AgentState.SUSPENDED, 15, "suspended at renewal")
        assert agent.renewals == 0 and not task.done()
        server.registry.resume_device(DeviceId(DEV), now=now(), actor="test")
        await until(lambda: agent.renewals >= 1, 15, "renewed after resume")
        assert agent.state is not AgentState.SUSPENDED
        agent.stop()
        assert await asyncio.wait_for(task, 15) == ExitCode.OK
    finally:
        server.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A real mosquitto from `mosquitto-config`, with its sync (test_revocation_mosquitto)."""
    yield from _start(tmp_path)


@pytest.mark.slow  # each TLS 1.3 revoked alert reaches the agent as a connect timeout
async def test_with_mosquitto_the_tls_alert_is_explained_by_the_service(
    mosquitto: Broker, tmp_path: Path
) -> None:
    """mosquitto refuses a certificate on hold with the TLS alert "certificate revoked", the
    same as a revoked one; the agent asks the service which it is, waits while suspended,
    carries on when resumed, and stops when revoked."""
    broker = mosquitto
    est = start_live_server(broker.home)  # the service of the same home, beside mosquitto
    sync = broker.sync()
    try:
        config = write_bundle(
            tmp_path / DEV,
            device=DEV,
            est_port=est.handle.est_port,
            mqtt_port=broker.port,
            root_cert=est.layout.root_cert,
            token=est.mint_device(DEV),
        )
        agent = agent_for(config)
        task = asyncio.create_task(agent.run())
        await until(lambda: agent.state is AgentState.CONNECTED, 20, "connected to mosquitto")
        assert agent.link is not None

        est.registry.suspend_device(DeviceId(DEV), now=now(), actor="test")
        assert sync.step().dropped == (DEV,)  # CRL with certificateHold + live drop
        await until(lambda: agent.state is AgentState.SUSPENDED, 20, "suspended")
        await asyncio.sleep(1.5)
        assert not task.done()
        connections = agent.link.connections

        est.registry.resume_device(DeviceId(DEV), now=now(), actor="test")
        sync.step()
        await until(lambda: agent.link.connections > connections, 20, "reconnected")  # type: ignore[union-attr]

        est.registry.revoke_device(DeviceId(DEV), reason="key-compromise", now=now(), actor="test")
        sync.step()
        assert await asyncio.wait_for(task, 30) == ExitCode.REFUSED
        assert agent.state is AgentState.REVOKED
    finally:
        est.stop()
