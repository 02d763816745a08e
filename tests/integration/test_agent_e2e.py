"""The real agent against the real service and its embedded broker on 127.0.0.1: factory bundle
to telemetry, renewal with key rotation, refusals, revocation, expiry, clock, restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from device_agent.agent import Agent, AgentState
from device_agent.backoff import Backoff
from device_agent.config import load_config
from device_agent.exit_codes import ExitCode
from device_agent.keystore import Keystore
from enroll_server.enrollment.identities import issue_service_identity
from enroll_server.pki.profile import DeviceProfile
from enroll_server.wiring.server import start_server
from tests.live_server import LiveServer, make_home, start_live_server
from tests.pki_helpers import make_ca

REPO = Path(__file__).resolve().parents[2]
FAST_EST = Backoff(base=0.2, factor=2.0, cap=1.0)
FAST_MQTT = Backoff(base=0.2, factor=2.0, cap=1.0)
DEV = "dev-000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_bundle(
    folder: Path,
    *,
    device: str,
    est_port: int,
    mqtt_port: int,
    root_cert: Path,
    token: str | None,
    interval: float = 0.5,
) -> Path:
    """What `fleetpki batch create` writes: agent.toml, ca.pem, token."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(root_cert, folder / "ca.pem")
    if token is not None:
        (folder / "token").write_text(token + "\n")
    (folder / "agent.toml").write_text(
        f"""[device]
id = "{device}"
key_type = "ec-p256"
[enroll]
server = "https://localhost:{est_port}"
token_file = "token"
trust_anchor = "ca.pem"
[mqtt]
host = "localhost"
port = {mqtt_port}
telemetry_interval = {interval}
[state]
dir = "state"
"""
    )
    return folder / "agent.toml"


def bundle_for(server: LiveServer, tmp: Path, device: str = DEV, mint: bool = True) -> Path:
    return write_bundle(
        tmp / device,
        device=device,
        est_port=server.handle.est_port,
        mqtt_port=server.mqtt_port,
        root_cert=server.layout.root_cert,
        token=server.mint_device(device) if mint else None,
    )


def make_agent(config: Path, **kw: object) -> Agent:
    return Agent(
        load_config(config),
        est_backoff=FAST_EST,
        mqtt_backoff=FAST_MQTT,
        **kw,  # type: ignore[arg-type]
    )


async def until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


@pytest.fixture
def short_stack(tmp_path: Path) -> Iterator[LiveServer]:
    """The service + broker issuing 6-second certificates (backdated 1 s)."""
    profile = DeviceProfile(validity=timedelta(seconds=6), backdate=timedelta(seconds=1))
    server = start_live_server(tmp_path / "home", broker=True, profile=profile)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def backend(live_stack: LiveServer) -> AsyncIterator[aiomqtt.Client]:
    return_value = await _backend(live_stack)
    async with return_value as client:
        await client.subscribe("devices/+/telemetry", qos=1)
        yield client


async def _backend(server: LiveServer) -> aiomqtt.Client:
    svc = issue_service_identity(server.layout.root, "backend", None, datetime.now(UTC))
    ctx = ssl.create_default_context(cafile=str(server.layout.root_cert))
    ctx.load_cert_chain(str(svc.cert), str(svc.key))
    return aiomqtt.Client("localhost", server.mqtt_port, identifier="backend", tls_context=ctx)


async def test_bundle_to_telemetry_and_commands(
    live_stack: LiveServer, backend: aiomqtt.Client, tmp_path: Path
) -> None:
    config = bundle_for(live_stack, tmp_path)
    commands: list[bytes] = []
    agent = make_agent(config, telemetry_hook=lambda: {"temp_c": 21.5}, on_command=commands.append)
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(15):
            async for msg in backend.messages:
                assert str(msg.topic) == f"devices/{DEV}/telemetry"
                data = json.loads(msg.payload)  # type: ignore[arg-type]
                break
        assert data["temp_c"] == 21.5
        assert data["agent_version"]
        assert data["uptime"] >= 0
        assert agent.identity is not None
        assert datetime.fromisoformat(data["cert_not_after"]) == agent.identity.not_after
        assert not (config.parent / "token").exists()  # single-use token deleted once stored
        assert agent.state is AgentState.CONNECTED
        status = json.loads((config.parent / "state" / "status.json").read_text())
        assert status["state"] == "connected" and status["last_connected"]
        await backend.publish(f"devices/{DEV}/commands", b'{"op": "blink"}', qos=1)
        await until(lambda: commands, 10, "command")
        assert commands == [b'{"op": "blink"}']
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 15) == ExitCode.OK
    assert agent.state is AgentState.STOPPED

    # `fleetpki-agent status` reads what the agent left behind.
    r = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["device"] == DEV
    assert report["certificate_serial"] == agent.identity.serial_hex
    assert report["last_connected"] == status["last_connected"]
    assert report["next_renewal"] and report["not_after"]


@pytest.mark.slow
async def test_short_lifetime_renews_rotates_key_and_reconnects(
    short_stack: LiveServer, tmp_path: Path
) -> None:
    """6-second certificates: the agent renews at ~2/3, with a new key each time, swaps
    atomically, reconnects with the new certificate by itself, keeps delivering."""
    config = bundle_for(short_stack, tmp_path)
    agent = make_agent(config)
    seen: list[tuple[str, bytes]] = []  # (serial, public key) of each identity
    task = asyncio.create_task(agent.run())
    received: list[dict] = []
    try:
        async with await _backend(short_stack) as obs:
            await obs.subscribe("devices/+/telemetry", qos=1)

            async def watch() -> None:
                async for msg in obs.messages:
                    received.append(json.loads(msg.payload))  # type: ignore[arg-type]

            watcher = asyncio.create_task(watch())

            def sample() -> None:
                from cryptography.hazmat.primitives import serialization

                ident = agent.identity
                if ident is not None and (not seen or seen[-1][0] != ident.serial_hex):
                    pub = (
                        ident.load_key()
                        .public_key()
                        .public_bytes(
                            serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo,
                        )
                    )
                    seen.append((ident.serial_hex, pub))

            try:
                async with asyncio.timeout(30):
                    while agent.renewals < 2:
                        sample()
                        await asyncio.sleep(0.05)
                sample()
                await until(lambda: agent.state is AgentState.CONNECTED, 10, "reconnected")
                count = len(received)
                await until(lambda: len(received) > count + 1, 10, "telemetry after rotation")
            finally:
                watcher.cancel()
        assert agent.link is not None
        assert agent.link.connections >= 3  # one session per certificate
        assert len({s for s, _ in seen}) >= 3 and len({k for _, k in seen}) >= 3  # new keys
        # Telemetry from the latest certificate's session: its not_after is the current one.
        assert received[-1]["cert_not_after"].startswith(
            agent.identity.not_after.isoformat()[:19]  # type: ignore[union-attr]
        )
        # Only the current generation is on disk: old keys destroyed.
        gens = sorted(p.name for p in (config.parent / "state").glob("gen-*"))
        assert gens == [agent.identity.key_path.parent.name]  # type: ignore[union-attr]
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 15) == ExitCode.OK


async def test_token_already_used_is_refused_without_retry(
    live_server: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = live_server.mint_device(DEV)
    first = write_bundle(
        tmp_path / "a",
        device=DEV,
        est_port=live_server.handle.est_port,
        mqtt_port=1,
        root_cert=live_server.layout.root_cert,
        token=token,
    )
    assert await make_agent(first).enroll() == ExitCode.OK
    second = write_bundle(
        tmp_path / "b",
        device=DEV,
        est_port=live_server.handle.est_port,
        mqtt_port=1,
        root_cert=live_server.layout.root_cert,
        token=token,
    )
    agent = make_agent(second)
    started = time.monotonic()
    assert await agent.enroll() == ExitCode.REFUSED
    assert time.monotonic() - started < 5
    assert agent.state is AgentState.REFUSED
    assert "401" in (agent.last_error or "")
    assert Keystore(second.parent / "state").load() is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # one clear line


async def test_wrong_trust_anchor_refuses_and_stores_nothing(
    live_server: LiveServer, tmp_path: Path
) -> None:
    config = bundle_for_server_only(live_server, tmp_path)
    stranger = make_ca()
    from cryptography.hazmat.primitives.serialization import Encoding

    (config.parent / "ca.pem").write_bytes(stranger.root.cert.public_bytes(Encoding.PEM))
    agent = make_agent(config)
    assert await agent.enroll() == ExitCode.CONFIG
    assert "trust anchor" in (agent.last_error or "")
    assert (config.parent / "token").exists()  # the token is not burnt
    assert Keystore(config.parent / "state").load() is None


def bundle_for_server_only(server: LiveServer, tmp: Path, device: str = DEV) -> Path:
    return write_bundle(
        tmp / device,
        device=device,
        est_port=server.handle.est_port,
        mqtt_port=1,
        root_cert=server.layout.root_cert,
        token=server.mint_device(device),
    )


async def test_server_down_at_first_boot_then_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    layout = make_home(home)
    port = free_port()
    from enroll_server.home.layout import hash_secret, new_secret
    from enroll_server.registry import Registry
    from fleetpki.identity import DeviceId

    token = new_secret()
    now = datetime.now(UTC)
    with Registry.open(layout.registry) as reg:
        reg.add_device(DeviceId(DEV), batch_id=None, now=now, actor="test")
        reg.add_token(DeviceId(DEV), hash_secret(token), now + timedelta(days=1), now)
    config = write_bundle(
        tmp_path / "b",
        device=DEV,
        est_port=port,
        mqtt_port=1,
        root_cert=layout.root_cert,
        token=token,
    )
    agent = make_agent(config)
    task = asyncio.create_task(agent.enroll())
    await asyncio.sleep(1.5)  # several refused connections with backoff
    assert not task.done() and agent.state is AgentState.ENROLLING
    assert "unavailable" in (agent.last_error or "")
    handle = await start_server(home, est_port=port, http_port=0, admin_port=0)
    try:
        assert await asyncio.wait_for(task, 15) == ExitCode.OK
    finally:
        await handle.stop()
    assert Keystore(config.parent / "state").load() is not None


def _short_server(tmp: Path, seconds: float, broker: bool = False) -> LiveServer:
    profile = DeviceProfile(validity=timedelta(seconds=seconds), backdate=timedelta(seconds=1))
    return start_live_server(tmp / "home", broker=broker, profile=profile)


async def test_revoked_at_renewal_stops_with_exit_3(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No broker here (MQTT keeps failing, which must not matter): the first renewal works,
    then the operator revokes, and the next simplereenroll answers 403 revoked."""
    server = _short_server(tmp_path, 4)
    try:
        config = bundle_for_server_only(server, tmp_path)
        agent = make_agent(config)
        task = asyncio.create_task(agent.run())
        await until(lambda: agent.renewals >= 1, 20, "first renewal")
        from fleetpki.identity import DeviceId

        server.registry.revoke_device(
            DeviceId(DEV), reason="key-compromise", now=datetime.now(UTC), actor="test"
        )
        assert await asyncio.wait_for(task, 20) == ExitCode.REFUSED
        assert agent.state is AgentState.REVOKED
        assert "revoked" in (agent.last_error or "")
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "revoked" in errors[0].getMessage()
        status = json.loads((config.parent / "state" / "status.json").read_text())
        assert status["state"] == "revoked"
    finally:
        server.stop()


async def test_revoked_mid_session_broker_drops_and_agent_stops(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    config = bundle_for(live_stack, tmp_path)
    agent = make_agent(config)
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.state is AgentState.CONNECTED, 15, "connected")
        from fleetpki.identity import DeviceId

        live_stack.registry.revoke_device(
            DeviceId(DEV), reason="key-compromise", now=datetime.now(UTC), actor="test"
        )
        code = await asyncio.wait_for(task, 30)
    finally:
        agent.stop()
    assert code == ExitCode.REFUSED
    assert agent.state in (AgentState.REFUSED, AgentState.REVOKED)
    assert agent.link is not None and agent.link.connections == 1  # no reconnect storm


async def test_expired_certificate_needs_a_new_token_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = _short_server(tmp_path, 2)
    try:
        config = bundle_for_server_only(server, tmp_path)
        assert await make_agent(config).enroll() == ExitCode.OK
        ident = Keystore(config.parent / "state").load()
        assert ident is not None
        await asyncio.sleep(max(0.0, (ident.not_after - datetime.now(UTC)).total_seconds()) + 0.5)
        # Powered off past expiry: a clear state, the recovery path, no loop.
        agent = make_agent(config)
        started = time.monotonic()
        assert await agent.run() == ExitCode.REBOOTSTRAP
        assert time.monotonic() - started < 5
        assert agent.state is AgentState.EXPIRED
        assert str(config.parent / "token") in (agent.last_error or "")
        assert "expired" in (agent.last_error or "")
        # The operator issues a new token; the agent re-bootstraps with it.
        from enroll_server.home.layout import hash_secret, new_secret
        from fleetpki.identity import DeviceId

        token = new_secret()
        now = datetime.now(UTC)
        server.registry.add_token(DeviceId(DEV), hash_secret(token), now + timedelta(days=1), now)
        (config.parent / "token").write_text(token)
        again = make_agent(config)
        assert await again.enroll() == ExitCode.OK
        fresh = Keystore(config.parent / "state").load()
        assert fresh is not None and fresh.serial_hex != ident.serial_hex
        assert fresh.not_after > datetime.now(UTC)
    finally:
        server.stop()


async def test_waits_for_a_sane_clock_and_says_so(
    live_server: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Pi without RTC boots in 1970: the agent waits (logging what for, with the server's
    Date as a hint) and enrolls once the clock is set."""
    config = bundle_for_server_only(live_server, tmp_path)
    synced = False

    def clock() -> datetime:
        return datetime.now(UTC) if synced else datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC)

    agent = make_agent(config, clock=clock, clock_poll=0.05)
    task = asyncio.create_task(agent.enroll())
    await until(lambda: "waiting for a sane clock" in caplog.text, 10, "clock log")
    assert agent.state is AgentState.WAITING_FOR_CLOCK
    await asyncio.sleep(0.3)
    assert not task.done()
    assert Keystore(config.parent / "state").load() is None
    assert "1970-01-01" in caplog.text
    assert f"server's clock says {datetime.now(UTC).year}" in caplog.text
    assert caplog.text.count("waiting for a sane clock") == 1  # said once, not every poll
    synced = True
    assert await asyncio.wait_for(task, 15) == ExitCode.OK


async def test_5xx_and_202_then_success(ca, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Against the scripted EST stand-in: 503, 202 + Retry-After, 500, then the certificate."""
    from aiohttp import web
    from cryptography.hazmat.primitives.serialization import Encoding

    from tests.integration.test_agent_est_client import Script, _server_ssl, make_app

    script = Script(ca)
    script.status = [
        (503, {}, b"busy"),
        (202, {"Retry-After": "1"}, b""),
        (500, {}, b"oops"),
    ]
    runner = web.AppRunner(make_app(script))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_ssl(ca, tmp_path))
    await site.start()
    try:
        root = tmp_path / "root.pem"
        root.write_bytes(ca.root.cert.public_bytes(Encoding.PEM))
        config = write_bundle(
            tmp_path / "b",
            device=DEV,
            est_port=runner.addresses[0][1],
            mqtt_port=1,
            root_cert=root,
            token="tok-1",
        )
        agent = make_agent(config)
        started = time.monotonic()
        assert await asyncio.wait_for(agent.enroll(), 30) == ExitCode.OK
        assert time.monotonic() - started >= 1.0  # Retry-After honoured
        assert Keystore(config.parent / "state").load() is not None
        assert not (config.parent / "token").exists()
    finally:
        await runner.cleanup()


@pytest.mark.slow
def test_kill_9_during_renewals_then_restart_works(tmp_path: Path) -> None:
    """SIGKILL the agent process at varied moments while it renews every ~4 s; after every
    kill the stored identity loads (key matches certificate) and is valid, and a restart
    connects. (6-second certificates leave ~2 s for a restart to come up before the one
    stored could expire; the write-level kill test is in tests/unit/test_agent_keystore.py.)"""
    server = _short_server(tmp_path, 6, broker=True)
    try:
        config = bundle_for(server, tmp_path)
        state = config.parent / "state"
        serials: set[str] = set()

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "device_agent.cli", "run", "--config", str(config)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        def status() -> dict:
            try:
                return json.loads((state / "status.json").read_text())
            except (OSError, ValueError):
                return {}

        for delay in (3.1, 4.6, 3.8):
            proc = start()
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            ident = Keystore(state).load()  # raises if the pair were inconsistent
            assert ident is not None
            assert ident.not_after > datetime.now(UTC)
            serials.add(ident.serial_hex)
        assert len(serials) >= 2  # renewals really were happening across the kills

        proc = start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st = status()
                if st.get("state") == "connected" and st.get("pid") == proc.pid:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"restarted agent never connected: {status()}")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == ExitCode.OK
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    finally:
        server.stop()


async def test_stop_right_after_connect_always_stops(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    """A stop landing as the broker answers must not be lost (Python 3.11's wait_for can
    swallow that cancellation; the agent cancels again until its tasks are done)."""
    config = bundle_for(live_stack, tmp_path)
    assert await make_agent(config).enroll() == ExitCode.OK
    for _ in range(6):
        agent = make_agent(config)
        task = asyncio.create_task(agent.run())
        async with asyncio.timeout(15):
            while agent.state is not AgentState.CONNECTED:
                await asyncio.sleep(0)
        agent.stop()
        assert await asyncio.wait_for(task, 5) == ExitCode.OK
