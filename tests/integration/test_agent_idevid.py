"""IDevID bootstrap end to end: bundles of `batch create --idevid` (made with the provisioning
API), the real agent, the real service and its embedded broker on 127.0.0.1.

The agent enrolls over mutual TLS with the factory birth certificate, then uses only the
operational certificate (MQTT, simplereenroll); the birth pair is kept and re-bootstraps an
expired device by itself; a revoked lot exits 3; a bundle whose key does not match exits 4.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from device_agent.agent import Agent, AgentState
from device_agent.backoff import Backoff
from device_agent.config import load_config
from device_agent.exit_codes import ExitCode
from device_agent.status import status_report
from enroll_server.enrollment.identities import issue_service_identity
from enroll_server.home.config import load_config as load_server_config
from enroll_server.pki.profile import DeviceProfile
from enroll_server.registry import CertStatus, Registry
from fleetpki.identity import DeviceId
from provisioning.batch import BatchRequest, IdevidOptions, create_batch
from provisioning.lifecycle import revoke_batch
from tests.live_server import LiveServer, make_home, start_live_server

REPO = Path(__file__).resolve().parents[2]
FAST = Backoff(base=0.2, factor=2.0, cap=1.0)
DEV = "sn-000001"


def make_idevid_stack(
    tmp_path: Path, profile: DeviceProfile | None = None
) -> tuple[LiveServer, Path, str]:
    """A home with an IDevID lot of 3 (`fleetpki batch create --idevid --prefix sn-`), then
    the service + broker on it (the EST TLS layer loads the manufacturer CAs at start)."""
    home, lot = tmp_path / "home", tmp_path / "lot"
    layout = make_home(home)
    with Registry.open(layout.registry) as registry:
        batch_id = create_batch(
            registry,
            layout,
            load_server_config(layout.config),
            BatchRequest(count=3, prefix="sn-", out_dir=lot, idevid=IdevidOptions("acme")),
            now=datetime.now(UTC),
            actor="test",
        ).batch_id
    return start_live_server(home, broker=True, profile=profile), lot, batch_id


@pytest.fixture
def idevid_stack(tmp_path: Path) -> Iterator[tuple[LiveServer, Path, str]]:
    live, lot, batch_id = make_idevid_stack(tmp_path)
    try:
        yield live, lot, batch_id
    finally:
        live.stop()


@pytest.fixture
def short_idevid_stack(tmp_path: Path) -> Iterator[tuple[LiveServer, Path, str]]:
    """As idevid_stack, issuing 6-second operational certificates (backdated 1 s)."""
    profile = DeviceProfile(validity=timedelta(seconds=6), backdate=timedelta(seconds=1))
    live, lot, batch_id = make_idevid_stack(tmp_path, profile)
    try:
        yield live, lot, batch_id
    finally:
        live.stop()


def retarget(bundle: Path, server: LiveServer) -> Path:
    """The bundle's agent.toml as the factory wrote it, pointed at this test's ports (the
    service listens on port 0, not on the configured 8443/8883) and a quick telemetry tick."""
    path = bundle / "agent.toml"
    text = path.read_text()
    assert 'idevid_cert = "idevid.pem"' in text and "token_file" not in text
    text, n_est = re.subn(
        r'(?m)^server = "https://([^:"/]+):\d+"',
        lambda m: f'server = "https://{m.group(1)}:{server.handle.est_port}"',
        text,
    )
    text, n_mqtt = re.subn(r"(?m)^port = \d+$", f"port = {server.mqtt_port}", text)
    text = re.sub(r"(?m)^telemetry_interval = .*$", "telemetry_interval = 0.5", text)
    assert n_est == n_mqtt == 1, text
    path.write_text(text)
    return path


def make_agent(config: Path) -> Agent:
    return Agent(load_config(config), est_backoff=FAST, mqtt_backoff=FAST)


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def issue_actors(server: LiveServer, device: str) -> list[str]:
    """Who asked for each certificate of the device, oldest first ('device-idevid' for a
    birth-certificate bootstrap, 'device' for simplereenroll with the current certificate)."""
    entries = server.registry.audit_log(device_id=DeviceId(device))
    return [e.actor for e in reversed(entries) if e.action == "certificate.issue"]


async def until(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def backend_client(server: LiveServer) -> aiomqtt.Client:
    svc = issue_service_identity(server.layout.root, "backend", None, datetime.now(UTC))
    ctx = ssl.create_default_context(cafile=str(server.layout.root_cert))
    ctx.load_cert_chain(str(svc.cert), str(svc.key))
    return aiomqtt.Client("localhost", server.mqtt_port, identifier="backend", tls_context=ctx)


def run_cli(config: Path, command: str = "run") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent.cli", command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


@pytest.mark.slow
async def test_idevid_bundle_enrolls_connects_renews_and_rebootstraps(
    short_idevid_stack: tuple[LiveServer, Path, str],
) -> None:
    server, lot, _ = short_idevid_stack
    bundle = lot / DEV
    config = retarget(bundle, server)
    birth_files = {n: (bundle / n).read_bytes() for n in ("idevid.pem", "idevid.key")}
    birth = x509.load_pem_x509_certificate(birth_files["idevid.pem"])
    agent = make_agent(config)
    task = asyncio.create_task(agent.run())
    try:
        async with backend_client(server) as backend:
            await backend.subscribe(f"devices/{DEV}/telemetry", qos=1)
            async with asyncio.timeout(15):
                async for msg in backend.messages:
                    data = json.loads(msg.payload)  # type: ignore[arg-type]
                    break
        assert data["cert_not_after"]
        assert agent.state is AgentState.CONNECTED
        ident = agent.identity
        assert ident is not None and agent.link is not None
        first = ident.cert
        # The operational certificate: CN = device id, from the fleet's issuing CA, for a
        # fresh key (not the birth key), stored in state/.
        assert first.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEV
        assert first.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
            "fleetpki Issuing CA"
        )
        assert spki(first) != spki(birth)
        assert ident.cert_path.is_relative_to(bundle / "state")
        # MQTT presents the operational pair, never the birth certificate.
        assert agent.link.credentials() == (ident.cert_path, ident.key_path)
        assert issue_actors(server, DEV) == ["device-idevid"]

        # Renewal at ~2/3 of 6 s: simplereenroll authenticated by the operational
        # certificate (audit actor 'device'), new key, reconnect.
        await until(lambda: agent.renewals >= 1 and agent.link.connections >= 2, 15)  # type: ignore[union-attr]
        renewed = agent.identity
        assert renewed is not None and spki(renewed.cert) not in (spki(first), spki(birth))
        assert agent.link.credentials() == (renewed.cert_path, renewed.key_path)
        assert issue_actors(server, DEV)[:2] == ["device-idevid", "device"]
        # The broker admitted the renewed certificate: the one it was renewed from is cut off.
        old = server.registry.get_certificate(first.serial_number)
        assert old is not None and old.status is CertStatus.REVOKED
        assert old.revocation_reason == "superseded"
        report, code = status_report(load_config(config), datetime.now(UTC))
        assert code == ExitCode.OK and report["certificate_serial"] == renewed.serial_hex
        assert report["bootstrap"].endswith("idevid.pem") and "token_present" not in report
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 15) == ExitCode.OK

    # The birth pair is the permanent factory identity: untouched, and no token appeared.
    assert {n: (bundle / n).read_bytes() for n in birth_files} == birth_files
    assert not (bundle / "token").exists()

    # Switched off past expiry: an IDevID device needs no operator token (no exit 5); it
    # re-bootstraps with its birth certificate.
    last = agent.identity
    assert last is not None
    await asyncio.sleep(max(0.0, (last.not_after - datetime.now(UTC)).total_seconds()) + 0.3)
    again = make_agent(config)
    assert await asyncio.wait_for(again.enroll(), 30) == ExitCode.OK
    assert again.identity is not None and again.identity.serial_hex != last.serial_hex
    assert issue_actors(server, DEV)[-1] == "device-idevid"


def test_idevid_of_a_revoked_lot_is_refused(
    idevid_stack: tuple[LiveServer, Path, str],
) -> None:
    server, lot, batch_id = idevid_stack
    config = retarget(lot / "sn-000002", server)
    revoke_batch(
        server.registry, batch_id, reason="key-compromise", now=datetime.now(UTC), actor="t"
    )
    r = run_cli(config)
    assert r.returncode == ExitCode.REFUSED, r.stderr
    assert "revoked" in r.stderr
    status = json.loads((config.parent / "state" / "status.json").read_text())
    assert status["state"] == "revoked" and status["serial"] is None
    assert not (config.parent / "state" / "identity.json").exists()
    assert issue_actors(server, "sn-000002") == []


def test_idevid_key_not_matching_is_a_config_error(
    idevid_stack: tuple[LiveServer, Path, str],
) -> None:
    server, lot, _ = idevid_stack
    config = retarget(lot / "sn-000003", server)
    # A factory mix-up: another device's birth key in this bundle.
    (config.parent / "idevid.key").write_bytes((lot / "sn-000001" / "idevid.key").read_bytes())
    r = run_cli(config)
    assert r.returncode == ExitCode.CONFIG, r.stderr
    assert "enroll.idevid_key" in r.stderr
    assert str(config.parent / "idevid.key") in r.stderr and "does not match" in r.stderr
    assert issue_actors(server, "sn-000003") == []
    # The pair of the wrong device (matching, but another CN) is refused locally as well.
    for name in ("idevid.pem", "idevid.key"):
        (config.parent / name).write_bytes((lot / "sn-000001" / name).read_bytes())
    r = run_cli(config, "enroll")
    assert r.returncode == ExitCode.CONFIG, r.stderr
    assert "enroll.idevid_cert" in r.stderr and "sn-000001" in r.stderr
    assert issue_actors(server, "sn-000003") == []
