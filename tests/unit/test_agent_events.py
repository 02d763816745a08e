"""Agent.on_event: the lifecycle events a real agent reports, against the real service and
broker on 127.0.0.1 (or against a dead port, for the retries)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from device_agent.agent import Agent, AgentState
from device_agent.backoff import Backoff
from device_agent.config import load_config
from device_agent.events import AgentEvent, EventKind
from device_agent.exit_codes import ExitCode
from enroll_server.pki.profile import DeviceProfile
from tests.integration.test_agent_e2e import bundle_for
from tests.live_server import LiveServer, start_live_server
from tests.pki_helpers import MemoryCa
from tests.unit.test_agent_lifecycle import _enrolled, bundle  # noqa: F401  (fixture)

FAST = Backoff(base=0.1, factor=2.0, cap=0.3)


def _agent(config: Path, events: list[AgentEvent], **kw: object) -> Agent:
    return Agent(
        load_config(config),
        est_backoff=FAST,
        mqtt_backoff=FAST,
        on_event=events.append,
        **kw,  # type: ignore[arg-type]
    )


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def _kinds(events: list[AgentEvent], kind: EventKind) -> list[AgentEvent]:
    return [e for e in events if e.kind is kind]


@pytest.fixture
def short_stack(tmp_path: Path) -> Iterator[LiveServer]:
    """Service + broker issuing 6-second certificates: a renewal within a few seconds."""
    profile = DeviceProfile(validity=timedelta(seconds=6), backdate=timedelta(seconds=1))
    server = start_live_server(tmp_path / "home", broker=True, profile=profile)
    try:
        yield server
    finally:
        server.stop()


def test_constructors_set_their_kinds_fields_and_a_monotonic_time() -> None:
    before = time.monotonic()
    event = AgentEvent.renewed("0a", "0b")
    assert (event.kind, event.old_serial, event.serial) == (EventKind.RENEWED, "0a", "0b")
    assert before <= event.at <= time.monotonic()
    retry = AgentEvent.retry("mqtt", "refused", 1.5)
    assert (retry.what, retry.why, retry.delay, retry.serial) == ("mqtt", "refused", 1.5, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.serial = "0c"  # type: ignore[misc]


async def test_enroll_connect_renew_reconnect_stop(short_stack: LiveServer, tmp_path: Path) -> None:
    events: list[AgentEvent] = []
    agent = _agent(bundle_for(short_stack, tmp_path), events)
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: len(_kinds(events, EventKind.CONNECTED)) >= 2, 20)
    finally:
        agent.stop()
        code = await asyncio.wait_for(task, 10)
    assert code is ExitCode.OK

    (enrolled,) = _kinds(events, EventKind.ENROLLED)
    renewed = _kinds(events, EventKind.RENEWED)[0]
    assert renewed.old_serial == enrolled.serial
    assert renewed.serial != enrolled.serial
    assert agent.identity is not None and agent.identity.serial_hex in {
        e.serial for e in _kinds(events, EventKind.RENEWED)
    }
    # The order of the story, each step after the one before it.
    first_connect = events.index(_kinds(events, EventKind.CONNECTED)[0])
    assert events.index(enrolled) < first_connect < events.index(renewed)
    rotation = _kinds(events, EventKind.DISCONNECTED)[0]
    assert events.index(renewed) < events.index(rotation)
    assert rotation.reason is not None and "renewed" in rotation.reason
    assert _kinds(events, EventKind.DISCONNECTED)[-1].reason == "stopped"
    states = [e.state for e in _kinds(events, EventKind.STATE)]
    assert states[:3] == [AgentState.ENROLLING, AgentState.CONNECTING, AgentState.CONNECTED]
    assert AgentState.RENEWING in states
    assert states[-1] == AgentState.STOPPED
    times = [e.at for e in events]
    assert times == sorted(times)
    assert not _kinds(events, EventKind.RETRY)  # a healthy stack: nothing retried


async def test_est_unreachable_reports_enroll_retries(bundle: Path) -> None:  # noqa: F811
    (bundle.parent / "token").write_text("a-token\n")
    events: list[AgentEvent] = []
    agent = _agent(bundle, events)
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: len(_kinds(events, EventKind.RETRY)) >= 2, 10)
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 10) is ExitCode.OK
    retries = _kinds(events, EventKind.RETRY)
    assert {e.what for e in retries} == {"enroll"}
    assert all(e.why and e.delay is not None and 0 < e.delay <= FAST.cap for e in retries)
    assert not _kinds(events, EventKind.ENROLLED)


async def test_broker_unreachable_reports_mqtt_retries(
    ca: MemoryCa,
    bundle: Path,  # noqa: F811
) -> None:
    _enrolled(ca, bundle)
    events: list[AgentEvent] = []
    agent = _agent(bundle, events)
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: len(_kinds(events, EventKind.RETRY)) >= 2, 10)
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 10) is ExitCode.OK
    retries = _kinds(events, EventKind.RETRY)
    assert {e.what for e in retries} == {"mqtt"}
    assert all(e.why for e in retries)
    # Never connected, so no session ended either.
    assert not _kinds(events, EventKind.CONNECTED) and not _kinds(events, EventKind.DISCONNECTED)


async def test_a_failing_callback_is_logged_once_and_breaks_nothing(
    live_stack: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[AgentEvent] = []

    def broken(event: AgentEvent) -> None:
        seen.append(event)
        raise RuntimeError("listener bug")

    agent = Agent(load_config(bundle_for(live_stack, tmp_path)), on_event=broken)
    caplog.set_level(logging.ERROR, logger="fleetpki.agent")
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: agent.state is AgentState.CONNECTED, 20)
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 10) is ExitCode.OK
    assert len(seen) >= 4  # every event was still delivered
    failures = [r for r in caplog.records if "on_event callback failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and "listener bug" in str(failures[0].exc_info[1])
