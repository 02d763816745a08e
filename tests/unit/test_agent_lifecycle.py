"""Agent outcomes decided before any network traffic: broken state, no token, stop; telemetry."""

from __future__ import annotations

import base64
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_agent.agent import Agent, AgentState
from device_agent.config import load_config
from device_agent.errors import ConfigError, StateCorrupt
from device_agent.exit_codes import ExitCode
from device_agent.keys import KeyType, generate_key
from device_agent.keystore import Keystore
from device_agent.telemetry import telemetry_payload
from tests.pki_helpers import MemoryCa
from tests.unit.test_agent_config import BUNDLE


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def bundle(ca: MemoryCa, tmp_path: Path) -> Path:
    port = _dead_port()  # nothing listens: any network attempt would fail, and slowly retry
    text = BUNDLE.replace("localhost:8443", f"127.0.0.1:{port}").replace("8883", str(port))
    (tmp_path / "agent.toml").write_text(text)
    (tmp_path / "ca.pem").write_bytes(ca.root.cert.public_bytes(Encoding.PEM))
    return tmp_path / "agent.toml"


def _enrolled(ca: MemoryCa, bundle: Path) -> Keystore:
    key = generate_key(KeyType.EC_P256)
    cert, _ = ca.device_cert("dev-000001", key=key)  # type: ignore[arg-type]
    store = Keystore(bundle.parent / "state")
    store.store(key, [cert, ca.issuing.cert], datetime.now(UTC) + timedelta(days=20))
    return store


async def test_no_certificate_and_no_token_needs_rebootstrap(bundle: Path) -> None:
    agent = Agent(load_config(bundle))
    started = time.monotonic()
    assert await agent.run() == ExitCode.REBOOTSTRAP
    assert time.monotonic() - started < 2
    assert agent.state is AgentState.EXPIRED
    assert "no certificate and no enrollment token" in (agent.last_error or "")
    assert str(bundle.parent / "token") in (agent.last_error or "")
    status = json.loads((bundle.parent / "state" / "status.json").read_text())
    assert status["state"] == "expired"


@pytest.mark.parametrize("damage", ["cert", "key", "record"])
async def test_damaged_state_is_a_config_exit(ca: MemoryCa, bundle: Path, damage: str) -> None:
    store = _enrolled(ca, bundle)
    ident = store.load()
    assert ident is not None
    target = {"cert": ident.cert_path, "key": ident.key_path, "record": store.identity_file}
    target[damage].write_bytes(b"\x00garbage")
    agent = Agent(load_config(bundle))
    assert await agent.run() == ExitCode.CONFIG
    assert agent.state is AgentState.BROKEN
    assert str(target[damage]) in (agent.last_error or "")


async def test_missing_trust_anchor_is_a_config_exit(ca: MemoryCa, bundle: Path) -> None:
    _enrolled(ca, bundle)
    (bundle.parent / "ca.pem").unlink()
    agent = Agent(load_config(bundle))
    assert await agent.run() == ExitCode.CONFIG
    assert "ca.pem" in (agent.last_error or "")


async def test_empty_token_file_is_a_config_exit(bundle: Path) -> None:
    (bundle.parent / "token").write_text("\n")
    assert await Agent(load_config(bundle)).enroll() == ExitCode.CONFIG


async def test_valid_identity_enroll_is_a_no_op_and_force_needs_a_token(
    ca: MemoryCa, bundle: Path
) -> None:
    _enrolled(ca, bundle)
    assert await Agent(load_config(bundle)).enroll() == ExitCode.OK
    assert await Agent(load_config(bundle)).enroll(force=True) == ExitCode.REBOOTSTRAP


async def test_stop_before_run_returns_ok(ca: MemoryCa, bundle: Path) -> None:
    _enrolled(ca, bundle)
    agent = Agent(load_config(bundle))
    agent.stop()
    assert await agent.run() == ExitCode.OK
    assert agent.state is AgentState.STOPPED


def test_telemetry_payload_fields_and_hook_cannot_spoof() -> None:
    now = datetime(2026, 5, 1, 12, tzinfo=UTC)
    body = telemetry_payload(
        now=now,
        uptime=12.345,
        cert_not_after=now + timedelta(days=3),
        agent_version="0.1.0",
        extra={"temp_c": 20, "agent_version": "evil"},
    )
    data = json.loads(body)
    assert data == {
        "ts": "2026-05-01T12:00:00Z",
        "uptime": 12.3,
        "cert_not_after": "2026-05-04T12:00:00Z",
        "agent_version": "0.1.0",
        "temp_c": 20,
    }
    bad = telemetry_payload(
        now=now, uptime=1, cert_not_after=now, agent_version="x", extra={"o": object()}
    )
    assert "o" not in json.loads(bad)


def _version_4(cert: x509.Certificate) -> bytes:
    """`cert` as PEM with tbsCertificate.version 3 (X.509 knows v1..v3, encoded 0..2)."""
    der = cert.public_bytes(Encoding.DER)
    v3 = b"\xa0\x03\x02\x01\x02"
    assert der.count(v3) == 1
    body = base64.encodebytes(der.replace(v3, b"\xa0\x03\x02\x01\x03"))
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


def test_trust_anchor_of_version_4_is_a_config_error(ca: MemoryCa, bundle: Path) -> None:
    """bench/fuzz/fuzz_agent_bundle.py: x509.InvalidVersion (no ValueError) escaped _anchors."""
    (bundle.parent / "ca.pem").write_bytes(_version_4(ca.root.cert))
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        Agent(load_config(bundle))._anchors()


def test_stored_chain_of_version_4_is_state_corrupt(ca: MemoryCa, bundle: Path) -> None:
    store = _enrolled(ca, bundle)
    identity = store.load()
    assert identity is not None
    identity.cert_path.write_bytes(_version_4(identity.chain[0]))
    reloaded = store.load()
    assert reloaded is not None
    with pytest.raises(StateCorrupt, match="not a valid PEM certificate chain"):
        reloaded.chain
