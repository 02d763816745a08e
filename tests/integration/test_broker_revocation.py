"""Live revocation: a revoked or suspended identity loses its live session within a second,
without its will, whichever process wrote the registry; the service identity's topic rights."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from enroll_server.broker import RunningBroker, start_broker
from enroll_server.registry import BatchKind
from tests.integration import broker_harness
from tests.integration.broker_harness import (
    PAHO_ACCEPTED,
    PAHO_NOT_AUTHORIZED,
    Fleet,
    PahoDevice,
    Witness,
    eventually,
)

fleet = broker_harness.fleet
broker = broker_harness.broker
witness = broker_harness.witness


async def _listener(fleet: Fleet, broker: RunningBroker) -> PahoDevice:
    """A backend service subscribed to all telemetry: it would see any will."""
    svc = PahoDevice(fleet.issue("backend", role="service"), broker.port, fleet.ca_file)
    assert await svc.connect() == PAHO_ACCEPTED
    assert await svc.subscribe("devices/+/telemetry") == [1]
    return svc


async def _device_with_will(fleet: Fleet, broker: RunningBroker, device_id: str) -> PahoDevice:
    creds = fleet.issue(device_id)
    dev = PahoDevice(
        creds, broker.port, fleet.ca_file, will=(f"devices/{device_id}/telemetry", b"will")
    )
    assert await dev.connect() == PAHO_ACCEPTED
    return dev


async def _dropped_within(dev: PahoDevice, seconds: float) -> float:
    started = time.monotonic()
    await eventually(lambda: dev.disconnects, seconds, "the session to be dropped")
    return time.monotonic() - started


async def test_revocation_by_another_connection_drops_without_will(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    listener = await _listener(fleet, broker)
    dev = await _device_with_will(fleet, broker, "doomed")
    # fleet.registry is its own SQLite connection, as another process would have.
    fleet.revoke("doomed")
    elapsed = await _dropped_within(dev, 1.0)
    assert elapsed < 1.0
    await dev.close()
    assert await listener.next_message(timeout=0.5) is None, "the will was published"
    again = PahoDevice(dev.creds, broker.port, fleet.ca_file)
    assert await again.connect() == PAHO_NOT_AUTHORIZED
    await again.close()
    assert 'fleetpki_broker_sessions_dropped_total{reason="revoked"} 1' in broker.metrics_text()
    await listener.close()
    await witness.assert_undisturbed()


_REVOKE_IN_CHILD = r"""
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from enroll_server.registry import Registry
from fleetpki.identity import DeviceId
with Registry.open(Path(sys.argv[1])) as registry:
    registry.revoke_device(DeviceId(sys.argv[2]), reason="keyCompromise",
                           now=datetime.now(UTC), actor="other-process")
    print(time.time(), flush=True)
"""


async def test_revocation_by_another_process(fleet: Fleet, broker: RunningBroker, witness: Witness):
    dev = await _device_with_will(fleet, broker, "remote")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _REVOKE_IN_CHILD,
        str(fleet.registry_path),
        "remote",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        committed_at = float((await proc.stdout.readline()).decode())
        await proc.wait()
    await eventually(lambda: dev.disconnects, 2.0, "the session to be dropped")
    latency = time.time() - committed_at
    await dev.close()
    assert proc.returncode == 0
    assert latency < 1.0, f"dropped {latency:.3f}s after the other process committed"
    await witness.assert_undisturbed()


async def test_suspend_drops_then_resume_readmits(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    listener = await _listener(fleet, broker)
    dev = await _device_with_will(fleet, broker, "napper")
    fleet.suspend("napper")
    assert await _dropped_within(dev, 1.0) < 1.0
    await dev.close()
    assert await listener.next_message(timeout=0.5) is None
    refused = PahoDevice(dev.creds, broker.port, fleet.ca_file)
    assert await refused.connect() == PAHO_NOT_AUTHORIZED
    await refused.close()
    fleet.resume("napper")
    back = PahoDevice(dev.creds, broker.port, fleet.ca_file)
    assert await back.connect() == PAHO_ACCEPTED
    await back.close()
    await listener.close()
    await witness.assert_undisturbed()


async def test_batch_revocation_drops_every_device_of_the_batch(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    now = datetime.now(UTC)
    fleet.registry.create_batch(
        "b1", [], kind=BatchKind.TOKEN.value, token_ttl=timedelta(days=1), now=now, actor="test"
    )
    devices = []
    for i in range(5):
        creds = fleet.issue(f"b1-{i}", batch_id="b1")
        dev = PahoDevice(creds, broker.port, fleet.ca_file)
        assert await dev.connect() == PAHO_ACCEPTED
        devices.append(dev)
    fleet.registry.revoke_batch("b1", reason="cessationOfOperation", now=now, actor="test")
    started = time.monotonic()
    await eventually(lambda: all(d.disconnects for d in devices), 1.0, "all five dropped")
    assert time.monotonic() - started < 1.0
    for d in devices:
        await d.close()
    assert set(broker.connected()) == {"witness"}
    await witness.assert_undisturbed()


async def test_in_process_disconnect_hook(fleet: Fleet, broker: RunningBroker, witness: Witness):
    listener = await _listener(fleet, broker)
    dev = await _device_with_will(fleet, broker, "target")
    assert broker.disconnect("target") is True
    assert await _dropped_within(dev, 0.5) < 0.5
    assert broker.disconnect("target") is False
    assert broker.disconnect("nobody") is False
    assert await listener.next_message(timeout=0.5) is None
    await dev.close()
    await listener.close()
    await witness.assert_undisturbed()


async def test_abnormal_disconnect_still_publishes_the_will(fleet: Fleet, broker: RunningBroker):
    """Only revocation suppresses the will: a device that vanishes still has it published."""
    listener = await _listener(fleet, broker)
    dev = await _device_with_will(fleet, broker, "crashy")
    assert dev.client is not None
    dev.client.socket().close()  # no DISCONNECT, as if the process crashed
    assert await listener.next_message(timeout=3.0) == ("devices/crashy/telemetry", b"will")
    await dev.close()
    await listener.close()


@pytest.fixture
async def sweeping_broker(fleet: Fleet) -> AsyncIterator[RunningBroker]:
    running = await start_broker(fleet.config(expiry_sweep_interval=0.2))
    yield running
    await running.stop()


async def test_session_ends_when_its_certificate_expires(
    fleet: Fleet, sweeping_broker: RunningBroker
):
    creds = fleet.issue("mayfly", validity=timedelta(seconds=2))  # notAfter = now + 2 s
    left = (creds.cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()
    assert left < 3.0
    dev = PahoDevice(creds, sweeping_broker.port, fleet.ca_file)
    assert await dev.connect() == PAHO_ACCEPTED
    await eventually(lambda: dev.disconnects, left + 2.0, "the expired session to be dropped")
    await dev.close()
    assert 'reason="cert_expired"' in sweeping_broker.metrics_text()


async def test_service_reads_telemetry_and_commands_devices(fleet: Fleet, broker: RunningBroker):
    svc = await _listener(fleet, broker)
    dev = PahoDevice(fleet.issue("sensor"), broker.port, fleet.ca_file)
    assert await dev.connect() == PAHO_ACCEPTED
    assert await dev.subscribe("devices/sensor/commands") == [1]
    dev.publish("devices/sensor/telemetry", b"21.5C")
    assert await svc.next_message() == ("devices/sensor/telemetry", b"21.5C")
    svc.publish("devices/sensor/commands", b"reboot")
    assert await dev.next_message() == ("devices/sensor/commands", b"reboot")
    # A service may not impersonate a device's telemetry nor read everything.
    svc.publish("devices/sensor/telemetry", b"fake")
    assert await svc.next_message(timeout=0.5) is None
    assert await svc.subscribe("devices/#") == [0x80]
    assert await svc.subscribe("devices/+/commands") == [0x80]
    await dev.close()
    await svc.close()


async def test_registry_changes_need_no_broker_restart(fleet: Fleet, broker: RunningBroker):
    """A device enrolled after the broker started is admitted (no cache to refresh)."""
    dev = PahoDevice(fleet.issue("newcomer"), broker.port, fleet.ca_file)
    assert await dev.connect() == PAHO_ACCEPTED
    await dev.close()


async def test_racing_connections_of_one_identity_leave_one_and_revocation_reaches_it(
    fleet: Fleet, broker: RunningBroker
):
    creds = fleet.issue("racer")
    devs = [PahoDevice(creds, broker.port, fleet.ca_file) for _ in range(4)]
    results = await asyncio.gather(*(d.connect() for d in devs))
    assert PAHO_ACCEPTED in results
    await eventually(
        lambda: sum(d.connected for d in devs) == 1, 3.0, "exactly one live connection"
    )
    assert list(broker.connected()) == ["racer"]
    fleet.revoke("racer")
    await eventually(lambda: not any(d.connected for d in devs), 1.0, "every racer dropped")
    for d in devs:
        await d.close()


async def test_subscriptions_are_cleaned_up_with_their_session(
    fleet: Fleet, broker: RunningBroker, witness: Witness
):
    dev = PahoDevice(fleet.issue("tidy"), broker.port, fleet.ca_file)
    assert await dev.connect() == PAHO_ACCEPTED
    assert await dev.subscribe("devices/tidy/commands") == [1]
    assert await dev.subscribe("devices/tidy/config/#") == [1]
    assert dev.client is not None
    dev.client.unsubscribe("devices/tidy/commands")
    subs = broker.broker.subscriptions
    await eventually(
        lambda: "devices/tidy/commands" not in subs or not subs["devices/tidy/commands"]
    )
    assert "devices/tidy/config/#" in subs
    await dev.close()
    # amqtt's session monitor ends disconnected clean sessions within about a second.
    await eventually(lambda: "devices/tidy/config/#" not in subs, 3.0, "the filter to go")
    assert list(subs) == ["devices/witness/#"]
    await witness.assert_undisturbed()
