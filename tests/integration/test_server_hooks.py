"""The service's public hooks for embedders (the simulator): a per-device certificate profile,
stopping and restarting EST on the same port, and the broker's live sessions. Real service,
real agents, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent.agent import Agent, AgentState
from device_agent.backoff import Backoff
from device_agent.config import load_config
from device_agent.exit_codes import ExitCode
from enroll_server.home.layout import HomeLayout, hash_secret, new_secret
from enroll_server.pki.profile import DeviceProfile
from enroll_server.wiring.server import ServerHandle, start_server
from fleetpki.identity import DeviceId
from tests.integration.test_agent_e2e import write_bundle
from tests.live_server import make_home

FAST = Backoff(base=0.1, factor=2.0, cap=0.3)
SHORT = DeviceProfile(validity=timedelta(hours=1), backdate=timedelta(seconds=1))


@pytest.fixture
def home(tmp_path: Path) -> HomeLayout:
    return make_home(tmp_path / "home")


@contextlib.asynccontextmanager
async def _serve(home: HomeLayout, **kw: object) -> AsyncIterator[ServerHandle]:
    handle = await start_server(home.root, est_port=0, http_port=0, mqtt_port=0, admin_port=0, **kw)  # type: ignore[arg-type]
    try:
        yield handle
    finally:
        await handle.stop()


def _agent(handle: ServerHandle, home: HomeLayout, folder: Path, device: str) -> Agent:
    """A registered device with a one-time token and its bundle for this server."""
    now = datetime.now(UTC)
    token = new_secret()
    handle.registry.add_device(DeviceId(device), batch_id=None, now=now, actor="test")
    handle.registry.add_token(DeviceId(device), hash_secret(token), now + timedelta(days=1), now)
    config = write_bundle(
        folder / device,
        device=device,
        est_port=handle.est_port,
        mqtt_port=handle.mqtt_port or 1,
        root_cert=home.root_cert,
        token=token,
    )
    return Agent(load_config(config), est_backoff=FAST, mqtt_backoff=FAST, persist_status=False)


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_profile_for_chooses_each_devices_lifetime(home: HomeLayout, tmp_path: Path) -> None:
    asked: list[DeviceId] = []
    default = DeviceProfile(validity=timedelta(days=30), backdate=timedelta(minutes=5))

    def profile_for(device_id: DeviceId) -> DeviceProfile:
        asked.append(device_id)
        return SHORT if device_id.value == "dev-short" else default

    async with _serve(home, profile=default, profile_for=profile_for) as handle:
        short = _agent(handle, home, tmp_path, "dev-short")
        normal = _agent(handle, home, tmp_path, "dev-normal")
        assert await short.enroll() == ExitCode.OK
        assert await normal.enroll() == ExitCode.OK
    assert short.identity is not None and normal.identity is not None
    lifetime = short.identity.not_after - short.identity.not_before
    assert lifetime == SHORT.validity + SHORT.backdate
    lifetime = normal.identity.not_after - normal.identity.not_before
    assert lifetime == default.validity + default.backdate
    assert asked == [DeviceId("dev-short"), DeviceId("dev-normal")]


async def test_stop_est_and_start_est_on_the_same_port(home: HomeLayout, tmp_path: Path) -> None:
    async with _serve(home) as handle:
        port = handle.est_port
        await handle.stop_est()
        await handle.stop_est()  # idempotent
        assert not handle.est_up
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        # CRL/OCSP stay up during the outage.
        _, writer = await asyncio.open_connection("127.0.0.1", handle.http_port)
        writer.close()
        agent = _agent(handle, home, tmp_path, "dev-000001")
        task = asyncio.create_task(agent.enroll())
        await _until(lambda: agent.last_error is not None, 10)  # refused, retrying
        assert not task.done()
        await handle.start_est()
        await handle.start_est()  # idempotent
        assert handle.est_up and handle.est_port == port
        assert await asyncio.wait_for(task, 15) == ExitCode.OK
        await handle.stop_est()  # stop() after stop_est() must still stop the rest


async def test_broker_sessions_name_the_presented_serial(home: HomeLayout, tmp_path: Path) -> None:
    async with _serve(home, broker=True) as handle:
        assert handle.broker is not None
        broker = handle.broker
        assert broker.sessions() == {}
        agent = _agent(handle, home, tmp_path, "dev-000001")
        task = asyncio.create_task(agent.run())
        try:
            await _until(lambda: agent.state is AgentState.CONNECTED, 20)
            await _until(lambda: "dev-000001" in broker.sessions(), 5)
            assert agent.identity is not None
            assert broker.sessions() == {"dev-000001": int(agent.identity.serial_hex, 16)}
        finally:
            agent.stop()
            assert await asyncio.wait_for(task, 10) == ExitCode.OK
        await _until(lambda: broker.sessions() == {}, 5)


async def test_the_server_checkpoints_the_wal_off_its_event_loop(home: HomeLayout) -> None:
    from enroll_server.registry.checkpointer import LOOP_AUTOCHECKPOINT_PAGES

    handle = await start_server(home.root, est_port=0, http_port=0, admin_port=0)
    checkpointer = handle.checkpointer
    try:
        assert checkpointer is not None and checkpointer.running
        assert handle.registry.wal_autocheckpoint == LOOP_AUTOCHECKPOINT_PAGES
        now = datetime.now(UTC)
        for i in range(20):
            handle.registry.add_device(DeviceId(f"ck-{i}"), batch_id=None, now=now, actor="t")
        # What the thread does every few seconds, on demand: the log is copied back whole.
        log_pages, copied = checkpointer.checkpoint()
        assert log_pages > 0 and copied == log_pages
    finally:
        await handle.stop()
    assert not checkpointer.running  # stopped with the server
