"""Real agents (6-second certificates) connected to the embedded broker through a root
rollover: each renews, takes the new root through the old-signed-new certificate, renews
under the issuing CA that then moves under the new root, and has no disconnection but the
planned one of each renewal; a new root offered without a valid cross-certificate is refused
and the agent keeps its anchor alone; a device that trusts only the old root still works."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_agent.agent import Agent, AgentState
from device_agent.est_wire import check_cacerts, check_issued, order_chain
from device_agent.events import AgentEvent, EventKind
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import (
    HomeLayout,
)
from enroll_server.pki.ca import Issuer, build_root_ca
from enroll_server.pki.keys import KeyType, generate_key, private_key_pem
from enroll_server.pki.profile import DeviceProfile
from enroll_server.pki.root_rollover import cross_certificate
from fleetpki.identity import DeviceId
from tests.ca_ceremony import fleetpki, openssl_verify, write_pem
from tests.integration.broker_harness import PAHO_ACCEPTED, Creds, PahoDevice
from tests.integration.test_agent_e2e import bundle_for, make_agent, until
from tests.integration.test_est import enroll
from tests.live_server import LiveServer, make_home, start_live_server

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
        # (newer than the old root, as agents want: a second may not have passed since init)
        later = datetime.now(UTC) + timedelta(seconds=5)
        fake_root = build_root_ca(fake_key, "", later, subject=old_root.subject)
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

        # 3. Issuance moves under the new root, while they are connected.
        issuing = await asyncio.to_thread(_issuing_under_the_new_root, layout)
        await _renew_once_more(agents)
        for agent in agents:
            assert agent.identity is not None and agent.identity.chain[1:] == (issuing,)
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
        # No failed connection attempt either (a renewal retried under load is no outage).
        failed = [e.why for e in seen if e.kind is EventKind.RETRY and e.what == "mqtt"]
        assert failed == [], (device, failed)
        assert sum(e.kind is EventKind.ENROLLED for e in seen) == 1  # never re-bootstrapped
        assert sum(e.kind is EventKind.RENEWED for e in seen) >= 2


def _issuing_under_the_new_root(layout: HomeLayout) -> x509.Certificate:
    """`fleetpki ca rollover` after a root rollover: an issuing CA under the new root becomes
    the current one; the old one stays live; server.pem is renewed by the new one."""
    done = fleetpki("ca", "rollover", "--home", str(layout.root))
    assert done.returncode == 0, done.stdout + done.stderr
    return x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())


async def test_devices_that_trust_only_the_old_root_work_under_the_new_issuing_ca(
    tmp_path: Path,
) -> None:
    """After the issuing CA moved under the new root, a device whose ca.pem holds only the
    old root verifies the server (server.pem sends the old-signed-new certificate) with the
    agent's TLS and openssl's, and the broker admits its chain leaf -> new issuing CA ->
    old-signed-new."""
    layout = make_home(tmp_path / "home")
    old_root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
    done = fleetpki("ca", "rollover-root", "--home", str(layout.root))
    assert done.returncode == 0, done.stdout + done.stderr
    issuing = _issuing_under_the_new_root(layout)
    sent = x509.load_pem_x509_certificates(layout.server_cert.read_bytes())
    old_with_new = x509.load_pem_x509_certificates(layout.root_update.read_bytes())[0]
    assert sent[1:] == [issuing, old_with_new]
    old_pem = write_pem(tmp_path / "old-root.pem", [old_root])
    verified = openssl_verify(
        old_pem, write_pem(tmp_path / "s.pem", sent[:1]), write_pem(tmp_path / "r.pem", sent[1:])
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr

    server = start_live_server(layout.root, broker=True)
    try:
        # A device with only the old root: the broker admits its chain through the
        # cross-certificate, and it verifies the broker with the old root alone.
        key = generate_key(KeyType.EC_P256)
        reply = enroll(server, "dev-old-root", server.mint_device("dev-old-root"), key)
        assert reply.status == 200, reply.text
        cacerts = check_cacerts(list(server.handle.state.cacerts()), [old_root])
        chain = order_chain(key, decode_certs_only(reply.body), cacerts, [old_root])
        assert chain[1:] == [issuing, old_with_new]
        check_issued(chain, key, DeviceId("dev-old-root"), [old_root], datetime.now(UTC))
        cert_path = write_pem(tmp_path / "dev.pem", chain)
        # What mosquitto and the RabbitMQ tier load (chain.pem) verifies it too (OpenSSL).
        by_chain_pem = openssl_verify(
            layout.chain, write_pem(tmp_path / "leaf.pem", chain[:1]),
            write_pem(tmp_path / "sent.pem", chain[1:]),
        )  # fmt: skip
        assert by_chain_pem.returncode == 0, by_chain_pem.stdout + by_chain_pem.stderr
        key_path = tmp_path / "dev.key"
        key_path.write_bytes(private_key_pem(key, None))
        creds = Creds("dev-old-root", chain[0], key, cert_path, key_path)
        device = PahoDevice(creds, server.mqtt_port, old_pem)
        try:
            assert await device.connect() == PAHO_ACCEPTED
        finally:
            await device.close()

        # The real agent from a bundle whose ca.pem is the old root: its first TLS connection
        # verifies the server through the cross-certificate; it takes the new root with
        # /cacerts, enrolls under the new issuing CA, and connects.
        bundle = bundle_for(server, tmp_path, "dev-agent")
        (bundle.parent / "ca.pem").write_bytes(old_pem.read_bytes())
        agent = make_agent(bundle)
        task = asyncio.create_task(agent.run())
        try:
            await until(lambda: agent.state is AgentState.CONNECTED, 20, "connected")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 20)
        new_root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
        assert _anchors(agent) == [old_root, new_root]
        assert agent.identity is not None and agent.identity.chain[1] == issuing
    finally:
        server.stop()
