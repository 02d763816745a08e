"""The fleet: N real device agents in one event loop, each recording its timeline.

Every simulated device is a `device_agent.Agent` with its own bundle, key, token, certificate
and mTLS connection; nothing on the wire is faked. The fleet only listens, through the agent's
public `on_event` hook: a `TraceRecorder` notes when it enrolled, connected, disconnected and
renewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from device_agent.agent import Agent, AgentState
from device_agent.backoff import Backoff
from device_agent.config import AgentConfig, EstServer, load_config
from device_agent.events import AgentEvent, EventKind
from device_agent.exit_codes import ExitCode
from simulators.delivery import message_key
from simulators.stack import Endpoints
from simulators.trace import DeviceTrace, Journal, Outcome

log = logging.getLogger("fleetpki.simulator")

Seconds = Callable[[], float]


# A fleet-wide listener: (device id, event) for every event of every agent (the benchmark
# counts retries with one).
FleetListener = Callable[[str, AgentEvent], None]
RENEW_RETRIES_KEPT = 5
# (device id, message key, monotonic time): a delivery receipt.
Receipt = Callable[[str, int, float], None]


def _receipt(on_receipt: Receipt, device_id: str, payload: bytes) -> None:
    on_receipt(device_id, message_key(payload), time.monotonic())


class TraceRecorder:
    """An agent's `on_event` callback: writes its lifecycle into the device's DeviceTrace (at
    the run's `seconds()`, read when the event arrives: the callback runs synchronously),
    then tells the fleet's listeners."""

    def __init__(
        self,
        trace: DeviceTrace,
        seconds: Seconds,
        on_up: Callable[[str], None] | None = None,
        listeners: list[FleetListener] | None = None,
    ) -> None:
        self.trace = trace
        self.seconds = seconds
        self.on_up = on_up
        self.listeners = listeners if listeners is not None else []

    def __call__(self, event: AgentEvent) -> None:
        trace = self.trace
        kind = event.kind
        if kind is EventKind.ENROLLED:  # token or IDevID bootstrap, re-bootstraps included
            if trace.enrolled is None:
                trace.enrolled = self.seconds()
            trace.serials.append(event.serial or "?")
        elif kind is EventKind.RENEWED:
            trace.renewed.append(self.seconds())
            trace.serials.append(event.serial or "?")
        elif kind is EventKind.CONNECTED:
            trace.connects.append(self.seconds())
            if self.on_up is not None:
                self.on_up(trace.device_id)
        elif kind is EventKind.DISCONNECTED and trace.connected:
            trace.disconnects.append(self.seconds())
        elif kind is EventKind.RETRY and event.what == "renew":
            trace.renew_retries.append((self.seconds(), event.why or "", event.delay or 0.0))
            del trace.renew_retries[:-RENEW_RETRIES_KEPT]
        for listener in self.listeners:
            listener(trace.device_id, event)


def published(agent: Agent) -> int:
    """Telemetry messages the broker acknowledged in the agent's current run."""
    return agent.link.published if agent.link is not None else 0


def failure_reason(state: AgentState, last_error: str | None) -> str:
    """A short slug for the report's "failed by reason" table."""
    err = (last_error or "").lower()
    if state is AgentState.REVOKED:
        return "revoked"
    if state is AgentState.EXPIRED:
        return "certificate-expired"
    if state is AgentState.BROKEN:
        return "config-or-state"
    if state is AgentState.REFUSED:
        if "not authorized" in err or "bad user name" in err:
            return "broker-refused"
        if "token" in err or "unknown device" in err:
            return "token-rejected"
        if "(400)" in err:
            return "csr-rejected"
        if "(429)" in err:
            return "throttled"
        return "refused"
    return str(state)


_OUTCOME = {
    AgentState.REVOKED: Outcome.REVOKED,
    AgentState.REFUSED: Outcome.REFUSED,
    AgentState.EXPIRED: Outcome.NEEDS_TOKEN,
    AgentState.BROKEN: Outcome.FAILED,
}


@dataclasses.dataclass
class AgentSettings:
    """What the simulator chooses for every agent on top of its bundle."""

    telemetry_interval: float = 5.0
    mqtt_backoff: Backoff | None = None
    est_backoff: Backoff | None = None
    clock_poll: float = 0.5
    # A device's wall clock; None = the real one (the clock-skew scenario sets its own).
    clock_for: Callable[[str], Callable[[], datetime]] | None = None
    # Where the agents enroll and connect, overriding their bundles (a `serve` started with
    # other ports than its fleetpki.toml says); None: as the bundle says.
    endpoints: Endpoints | None = None
    # (device id, message_key(payload), time.monotonic()) for each telemetry message the
    # broker acknowledged: every agent's delivery receipts (Agent on_delivered), by key so
    # that agents in other processes can report them too (simulators/sharded_fleet.py).
    on_receipt: Receipt | None = None


class FleetBase:
    """What a scenario sees of a fleet, wherever its agents run: this process (`Fleet`) or
    several (`simulators.sharded_fleet.ShardedFleet`). Subclasses start and stop agents and
    call `_settle` when one connects or ends."""

    def __init__(
        self,
        bundles: dict[str, Path],
        journal: Journal,
        seconds: Seconds,
        settings: AgentSettings,
        rng: random.Random,
    ) -> None:
        self.bundles = bundles  # device id -> agent.toml
        self.journal = journal
        self.seconds = seconds
        self.settings = settings
        self.rng = rng
        # Called with (device id, event) for every agent's every event.
        self.listeners: list[FleetListener] = []
        # Called with the device id when an agent's run ends (its trace has the outcome).
        self.ended_listeners: list[Callable[[str], None]] = []
        # Started, but neither connected yet nor stopped: the bring-up still in flight.
        self.pending: set[str] = set()
        self._settled = asyncio.Event()
        for device_id in bundles:
            journal.trace(device_id)

    @property
    def ids(self) -> list[str]:
        return list(self.bundles)

    def _settle(self, device_id: str) -> None:
        self.pending.discard(device_id)
        self._settled.set()

    def _record_end(self, device_id: str) -> None:
        """An agent's run ended (its trace has the outcome): note when, and tell listeners."""
        trace = self.journal.trace(device_id)
        trace.ended = self.seconds()
        if trace.connected:  # a stopped agent's session ended with it
            trace.disconnects.append(trace.ended)
        self._settle(device_id)
        for listener in self.ended_listeners:
            listener(device_id)

    async def start(
        self,
        ids: Iterable[str] | None = None,
        ramp: float | None = None,
        max_inflight: int | None = None,
    ) -> None:
        raise NotImplementedError

    async def stop(self, ids: Iterable[str] | None = None, grace: float = 15.0) -> None:
        raise NotImplementedError

    def running(self, device_id: str) -> bool:
        raise NotImplementedError

    def describe(self, device_id: str) -> tuple[str | None, str | None]:
        """(the agent's state, its last error) for a report; (None, None) if never started."""
        raise NotImplementedError

    def sync_counts(self) -> None:
        """Copy each agent's acknowledged-message count into its trace."""
        raise NotImplementedError

    def processes(self) -> list[int]:
        """The pids of the processes the agents run in besides this one."""
        return []

    def take_lag(self) -> float:
        """The worst event-loop lateness in those processes since the last call."""
        return 0.0

    async def wait_settled(self, within: float) -> bool:
        """Until every started agent is connected or stopped (cheap at any fleet size)."""
        deadline = self.seconds() + within
        while self.pending:
            left = deadline - self.seconds()
            if left <= 0:
                return False
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self._settled.wait()
        return True

    async def wait_until(
        self, predicate: Callable[[], bool], within: float, poll: float = 0.05
    ) -> bool:
        """Poll `predicate` until true or `within` seconds; returns its last value."""
        deadline = self.seconds() + within
        while not predicate():
            if self.seconds() >= deadline:
                return False
            await asyncio.sleep(poll)
        return True

    def connected(self, ids: Iterable[str] | None = None) -> list[str]:
        chosen = self.ids if ids is None else ids
        return [d for d in chosen if self.journal.trace(d).connected]

    def settled(self, device_id: str) -> bool:
        """Connected, or stopped for good: nothing more will happen without a change."""
        return self.journal.trace(device_id).connected or not self.running(device_id)


class Fleet(FleetBase):
    """Starts, watches and stops the agents of a set of bundle folders, in this process."""

    def __init__(
        self,
        bundles: dict[str, Path],
        journal: Journal,
        seconds: Seconds,
        settings: AgentSettings,
        rng: random.Random,
    ) -> None:
        super().__init__(bundles, journal, seconds, settings, rng)
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._sent_before: dict[str, int] = {}

    def config_of(self, device_id: str) -> AgentConfig:
        """The agent configuration of `device_id`: its bundle plus the simulator's settings."""
        cfg = load_config(self.bundles[device_id])
        cfg = dataclasses.replace(cfg, telemetry_interval=self.settings.telemetry_interval)
        ep = self.settings.endpoints
        if ep is not None:
            server = EstServer(url=ep.est_url, host=ep.host, port=ep.est_port, path_prefix="")
            cfg = dataclasses.replace(cfg, server=server, mqtt_host=ep.host, mqtt_port=ep.mqtt_port)
        return cfg

    def start_one(self, device_id: str) -> None:
        """Start (or restart, after it stopped) the agent of `device_id`."""
        running = self.tasks.get(device_id)
        if running is not None and not running.done():
            return
        trace = self.journal.trace(device_id)
        s = self.settings
        kwargs: dict[str, Any] = {
            "rng": random.Random(self.rng.random()),
            "clock_poll": s.clock_poll,
            # status.json is for `fleetpki-agent status`; thousands of fsyncs would only
            # measure the disk.
            "persist_status": False,
        }
        if s.mqtt_backoff is not None:
            kwargs["mqtt_backoff"] = s.mqtt_backoff
        if s.est_backoff is not None:
            kwargs["est_backoff"] = s.est_backoff
        if s.clock_for is not None:
            kwargs["clock"] = s.clock_for(device_id)
        if s.on_receipt is not None:
            kwargs["on_delivered"] = functools.partial(_receipt, s.on_receipt, device_id)
        recorder = TraceRecorder(trace, self.seconds, on_up=self._settle, listeners=self.listeners)
        agent = Agent(self.config_of(device_id), on_event=recorder, **kwargs)
        self.agents[device_id] = agent
        trace.outcome = Outcome.RUNNING
        trace.reason = trace.detail = None
        if trace.started is None:
            trace.started = self.seconds()
        self.pending.add(device_id)
        self.tasks[device_id] = asyncio.create_task(
            self._run(device_id, agent), name=f"agent-{device_id}"
        )

    async def _run(self, device_id: str, agent: Agent) -> None:
        trace = self.journal.trace(device_id)
        try:
            code = await agent.run()
        except Exception as exc:  # a crash of one agent must not end the simulation
            log.exception("%s: agent crashed", device_id)
            trace.outcome, trace.reason = Outcome.FAILED, f"crash:{type(exc).__name__}"
            trace.detail = str(exc)
            code = ExitCode.CRASH
        else:
            if code is ExitCode.OK:
                trace.outcome = Outcome.STOPPED
            else:
                trace.outcome = _OUTCOME.get(agent.state, Outcome.FAILED)
                trace.reason = failure_reason(agent.state, agent.last_error)
                trace.detail = agent.last_error
        finally:
            self._sent_before[device_id] = self._sent_before.get(device_id, 0) + published(agent)
            self._record_end(device_id)

    async def start(
        self,
        ids: Iterable[str] | None = None,
        ramp: float | None = None,
        max_inflight: int | None = None,
    ) -> None:
        """Start agents, `ramp` per second (None: all at once) and, with `max_inflight`, never
        more than that many still enrolling or connecting (a closed loop: the fleet comes up
        as fast as the stack takes it, never so fast that it times out and retries)."""
        todo = list(self.ids if ids is None else ids)
        begin = self.seconds()
        for i, device_id in enumerate(todo):
            if ramp:
                due = begin + i / ramp
                if (wait := due - self.seconds()) > 0:
                    await asyncio.sleep(wait)
            while max_inflight is not None and len(self.pending) >= max_inflight:
                self._settled.clear()
                await self._settled.wait()
            self.start_one(device_id)
            if not ramp and max_inflight is None:
                await asyncio.sleep(0)

    async def stop(self, ids: Iterable[str] | None = None, grace: float = 15.0) -> None:
        """Stop agents (a device switched off) and wait for their tasks to end."""
        chosen = list(self.tasks if ids is None else ids)
        for device_id in chosen:
            agent = self.agents.get(device_id)
            if agent is not None:
                agent.stop()
        tasks = [self.tasks[d] for d in chosen if d in self.tasks and not self.tasks[d].done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)

    def running(self, device_id: str) -> bool:
        task = self.tasks.get(device_id)
        return task is not None and not task.done()

    def describe(self, device_id: str) -> tuple[str | None, str | None]:
        """(the agent's state, its last error) for a report; (None, None) if never started."""
        agent = self.agents.get(device_id)
        return (str(agent.state), agent.last_error) if agent is not None else (None, None)

    def sync_counts(self) -> None:
        """Copy each agent's acknowledged-message count into its trace."""
        for device_id, trace in self.journal.traces.items():
            agent = self.agents.get(device_id)
            live = published(agent) if agent is not None and self.running(device_id) else 0
            trace.sent = self._sent_before.get(device_id, 0) + live
