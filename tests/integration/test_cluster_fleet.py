"""A fleet on two `fleetpki serve` nodes sharing one PostgreSQL registry: 200 real device
agents whose bundles name both nodes (`batch create --est-url A --est-url B --broker A
--broker B`) enroll and connect through both, and the registry shows each certificate once.

Real servers on 127.0.0.1:0 with their embedded brokers, the simulator's fleet of real agents
(simulators/fleet.py: EST over TLS, mTLS MQTT), the session's throwaway PostgreSQL cluster.
The race of one token at both nodes is test_registry_postgres_serve's
test_one_token_raced_at_two_nodes_yields_one_certificate.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives import hashes
from typer.testing import CliRunner

from device_agent.backoff import Backoff
from device_agent.config import load_config
from device_agent.keystore import Keystore
from enroll_server.cli.app import app
from enroll_server.registry.codec import serial_hex
from simulators.fleet import AgentSettings, Fleet
from simulators.trace import Journal, Outcome
from tests.integration.test_cluster_revocation import two_brokers  # noqa: F401  (fixture)
from tests.live_server import LiveServer

DEVICES = 200


def _batch(a: LiveServer, b: LiveServer, out: Path) -> dict[str, Path]:
    """A factory batch whose bundles list both nodes' EST URLs and brokers; id -> agent.toml."""
    args = ["batch", "create", "--home", str(a.layout.root), "--count", str(DEVICES),
            "--prefix", "two-", "--out", str(out)]  # fmt: skip
    for node in (a, b):
        args += ["--est-url", f"https://localhost:{node.handle.est_port}"]
        args += ["--broker", f"localhost:{node.mqtt_port}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {p.parent.name: p for p in sorted(out.glob("*/agent.toml"))}


def _enrolled(node: LiveServer) -> int:
    return node.handle.state.metrics.enrollments.values["simpleenroll_ok"]


async def test_200_agents_enroll_through_both_nodes_each_certificate_recorded_once(
    two_brokers: tuple[LiveServer, LiveServer],  # noqa: F811
    tmp_path: Path,
    pg_url: str,
) -> None:
    a, b = two_brokers
    bundles = _batch(a, b, tmp_path / "lot")
    assert len(bundles) == DEVICES
    first = Counter(load_config(p).est_servers[0].port for p in bundles.values())
    assert set(first) == {a.handle.est_port, b.handle.est_port}, first  # spread over both
    journal = Journal()
    settings = AgentSettings(
        telemetry_interval=60.0,
        est_backoff=Backoff(base=0.2, factor=2.0, cap=2.0),
        mqtt_backoff=Backoff(base=0.2, factor=2.0, cap=2.0),
    )
    fleet = Fleet(bundles, journal, time.monotonic, settings, random.Random(15))
    try:
        await fleet.start()
        assert await fleet.wait_settled(within=60), f"{len(fleet.pending)} agents still coming up"
        up = fleet.connected()
        assert len(up) == DEVICES, {
            d: (t.outcome, t.reason, t.detail) for d, t in journal.traces.items() if d not in up
        }
    finally:
        await fleet.stop()
    assert all(t.outcome is Outcome.STOPPED for t in journal.traces.values())
    assert all(len(t.serials) == 1 for t in journal.traces.values())  # one enrollment each

    # Each node issued some of them (its own counter), and between them exactly one each.
    by_a, by_b = _enrolled(a), _enrolled(b)
    assert by_a > 0 and by_b > 0 and by_a + by_b == DEVICES, (by_a, by_b)

    # Every agent holds a certificate, recorded once, for its own device; no token twice.
    with psycopg.connect(pg_url) as db:
        rows = db.execute(
            "SELECT serial, device_id, fingerprint_sha256, status FROM certificates"
        ).fetchall()
        tokens = db.execute("SELECT device_id, used_at FROM tokens").fetchall()
        issued = db.execute(
            "SELECT device_id FROM audit WHERE action = 'certificate.issue'"
        ).fetchall()
    by_serial = {r[0]: r for r in rows}
    assert len(rows) == len(by_serial) == DEVICES
    assert sorted(r[1] for r in rows) == sorted(bundles)
    for device, config in bundles.items():
        held = Keystore(load_config(config).state_dir).load()
        assert held is not None, f"{device} holds no certificate"
        cert = held.cert
        row = by_serial[serial_hex(cert.serial_number)]
        assert row[1] == device and row[3] == "active", row
        assert row[2] == cert.fingerprint(hashes.SHA256()).hex()
    assert sorted(t[0] for t in tokens) == sorted(bundles)  # one token per device
    assert all(t[1] is not None for t in tokens)  # each spent, once (one row each)
    assert Counter(i[0] for i in issued) == Counter(dict.fromkeys(bundles, 1))
