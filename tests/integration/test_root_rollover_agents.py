"""Real agents (6-second certificates) connected to the embedded broker through a root
rollover: each renews, takes the new root through the old-signed-new certificate, and has no
disconnection but the planned one of each renewal; a new root offered without a valid
cross-certificate is refused and the agent keeps its anchor alone."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_agent.agent import Agent, AgentState
from device_agent.events import AgentEvent, EventKind
from enroll_server.pki.ca import Issuer, build_root_ca
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.profile import DeviceProfile
from enroll_server.pki.root_rollover import cross_certificate
from tests.ca_ceremony import fleetpki
from tests.integration.test_agent_e2e import bundle_for, make_agent, until
from tests.live_server import LiveServer, start_live_server

PLANNED = "reconnecting with the renewed certificate"  # device_agent.mqtt_link: a renewal
DEVICES = 3


@pytest.fixture
def stack(tmp_path: Path) -> LiveServer:
    profile = DeviceProfile(validity=timedelta(seconds=6), backdate=timedelta(seconds=1))
    server = start_live_server(
        tmp_path / "home", broker=True, profile=profile, cert_check_interval=0.5
    )
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


def _anchors(agent: Agent) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(agent.config.trust_anchor.read_bytes())


async def _renew_once_more(agents: list[Agent]) -> None:
    """Until every agent has renewed (fetching /cacerts) at least once from now on."""
    marks = [a.renewals for a in agents]
    await until(
        lambda: all(a.renewals > m for a, m in zip(agents, marks, strict=True)),
        30,
        "a renewal of every agent",
    )


@pytest.mark.slow
async def test_a_fleet_of_agents_moves_to_the_new_root_without_a_disconnection(
    stack: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fleetpki.agent")
    layout = stack.layout
    old_root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
    events: dict[str, list[AgentEvent]] = {}
    agents = []
    for n in range(DEVICES):
        device = f"dev-root-{n}"
        events[device] = []
        config = bundle_for(stack, tmp_path, device)
        agents.append(make_agent(config, on_event=events[device].append))
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        await until(
            lambda: all(a.state is AgentState.CONNECTED for a in agents), 20, "all connected"
        )

        # 1. An impostor: a new root with the old root's name offered in /cacerts with a
        # cross-certificate signed by another key (the name says "old root", the key not).
        fake_key = generate_key(KeyType.EC_P256)
        fake_root = build_root_ca(fake_key, "", datetime.now(UTC), subject=old_root.subject)
        forger_key = generate_key(KeyType.EC_P256)
        forger = Issuer(
            build_root_ca(forger_key, "", datetime.now(UTC), subject=old_root.subject),
            forger_key,
        )
        forged = cross_certificate(fake_root, forger, datetime.now(UTC))
        layout.root_update.write_bytes(
            b"".join(c.public_bytes(Encoding.PEM) for c in (fake_root, forged))
        )
        await _renew_once_more(agents)
        for agent in agents:
            assert _anchors(agent) == [old_root]
        assert "not trusted: the cross-certificate is refused: its signature does not verify" in (
            caplog.text
        )
        layout.root_update.unlink()

        # 2. The real rollover, while every agent is connected.
        done = await asyncio.to_thread(fleetpki, "ca", "rollover-root", "--home", str(layout.root))
        assert done.returncode == 0, done.stdout + done.stderr
        new_root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
        await _renew_once_more(agents)
        for agent in agents:
            assert _anchors(agent) == [old_root, new_root]  # the old anchor stays
        assert caplog.text.count("new trust anchor") == DEVICES
        await until(
            lambda: all(a.state is AgentState.CONNECTED for a in agents), 10, "all connected"
        )
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
    for device, seen in events.items():
        unplanned = [
            e.reason for e in seen if e.kind is EventKind.DISCONNECTED and e.reason != PLANNED
        ]
        # The last one is the stop at the end of the test.
        assert unplanned in ([], ["stopped"]), (device, unplanned)
        failed = [(e.what, e.why) for e in seen if e.kind is EventKind.RETRY]
        assert failed == [], (device, failed)
        assert sum(e.kind is EventKind.RENEWED for e in seen) >= 2
