"""The soak: a fleet renewing, being revoked and losing its broker, for a long time.

`fleetpki serve --no-broker` and `fleetpki broker` run as two processes on a temporary home
whose device certificates last `validity` (about a minute in the long form, so every agent
renews many times); the simulator's agents (real device_agent.Agent instances, this process)
enroll, stream QoS 1 telemetry to an observer, renew at 2/3 of each lifetime; every
`revoke_every` a share of the fleet is revoked as an operator would; every `broker_every` the
broker process is stopped and started again. Every `sample_every` the resident memory and
open file descriptors of the three processes are sampled, with the number of connected
agents.

What it reports (SoakResult; bench/soak.py prints it, plots it and writes JSON):
- the slope of RSS and fds after the warm-up (target: flat);
- QoS 1 telemetry: acknowledged by the broker (PUBACK) vs seen by the observer, matched
  message by message (simulators/delivery.py) per broker lifetime after the observer is
  subscribed and the fleet reconnected (a subscriber with a clean session has no claim on
  what is published while it is away, so what is acknowledged during a restart is reported
  apart);
- stuck agents: not revoked, yet down at the end and for ROTATION_GRACE s more (or stopped
  on an error);
- revoked agents still connected at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulators.delivery import DeliveryLedger, message_key
from simulators.report import Check, Report
from simulators.scenarios.base import Scenario
from simulators.simulation import Simulation, SimulationOptions
from simulators.stack import HOST, Ports, die_with_parent, free_port, init_temp_home
from simulators.trace import Outcome

if TYPE_CHECKING:
    from simulators.fleet import AgentSettings

START_TIMEOUT = 60.0
QUIET = 5.0  # seconds without a message reaching the observer: it has all it will get
ROTATION_GRACE = 20.0  # seconds an agent found down at the end has to show it is not stuck


@dataclass(frozen=True, slots=True)
class SoakOptions:
    devices: int = 20
    duration: float = 120.0  # seconds of soak after the fleet is up
    validity: float = 60.0  # device certificate lifetime, seconds
    revoke_share: float = 0.01  # of the fleet, each revoke_every
    revoke_every: float = 60.0
    broker_every: float = 300.0
    sample_every: float = 10.0
    telemetry_interval: float = 5.0
    warmup: float = 0.25  # share of the run before the slope is measured
    max_inflight: int = 32
    workdir: Path | None = None
    seed: int | None = None
    keep: bool = False  # keep the temporary folder (home, process logs) for inspection
    shards: int = 1  # processes the simulated agents run in (simulators/sharded_fleet.py)


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the soak began
    rss: dict[str, int]  # process -> bytes
    fds: dict[str, int]
    connected: int


LOST_TIMES_KEPT = 100  # acknowledgment times of lost messages kept per segment


@dataclass
class Segment:
    """One broker lifetime's telemetry accounting (from the baseline to the drain)."""

    started: float
    acknowledged: int = 0
    received: int = 0
    lost: int = 0
    lost_by_device: dict[str, int] = field(default_factory=dict)
    # when (soak seconds) the lost messages were acknowledged: the first LOST_TIMES_KEPT
    lost_acked_at: list[float] = field(default_factory=list)


@dataclass
class SoakResult:
    options: SoakOptions
    devices: int
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)
    revocations: list[tuple[float, str]] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    window_acknowledged: int = 0  # during broker restarts (observer away)
    window_received: int = 0
    renewals: int = 0
    min_renewals: int = 0  # the fewest renewals of an agent never revoked
    stuck: list[str] = field(default_factory=list)
    # device -> [agent state, last error, outcome, seconds since its last connect or None,
    # its last 3 disconnects, its last renewal, its last failed renewal attempts (t, why,
    # delay)] (times in soak seconds)
    stuck_detail: dict[str, list[object]] = field(default_factory=dict)
    revoked_connected: list[str] = field(default_factory=list)
    # (t, seconds): the simulator's event loop lateness, the worst of each sample period (a
    # 0.1-s heartbeat): how long 2,000 agents in one process wait for their own loop.
    loop_lag: list[tuple[float, float]] = field(default_factory=list)
    report: Report | None = None

    @property
    def acknowledged(self) -> int:
        return sum(s.acknowledged for s in self.segments)

    @property
    def received(self) -> int:
        return sum(s.received for s in self.segments)

    @property
    def lost(self) -> int:
        return sum(s.lost for s in self.segments)

    def series(self, kind: str, process: str) -> list[tuple[float, int]]:
        return [(s.t, getattr(s, kind)[process]) for s in self.samples if process in s.rss]

    def slope_per_hour(self, kind: str, process: str) -> float | None:
        """Least-squares slope of `kind` ('rss' bytes, 'fds') after the warm-up, per hour.

        The broker's is taken within each of its lifetimes (a restart starts it afresh) and
        averaged, weighted by the samples in each."""
        start = self.seconds * self.options.warmup
        points = [(t, v) for t, v in self.series(kind, process) if t >= start]
        if process != "broker":
            return _slope(points)
        bounds = [start, *[r for r in self.restarts if r > start], float("inf")]
        weighted = 0.0
        count = 0
        for lo, hi in itertools.pairwise(bounds):
            part = [(t, v) for t, v in points if lo <= t < hi]
            slope = _slope(part)
            if slope is not None:
                weighted += slope * len(part)
                count += len(part)
        return weighted / count if count else None

    def after_warmup(self, kind: str, process: str) -> tuple[int, int]:
        """(value at the first sample after the warm-up, value at the last sample)."""
        start = self.seconds * self.options.warmup
        points = [v for t, v in self.series(kind, process) if t >= start]
        return (points[0], points[-1]) if points else (0, 0)


def _slope(points: list[tuple[float, int]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600


class Services:
    """`fleetpki serve --no-broker` and `fleetpki broker` as child processes of one home."""

    def __init__(self, home: Path, logs: Path) -> None:
        self.home = home
        self.logs = logs
        self.server: subprocess.Popen[bytes] | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self._broker_runs = 0

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        command = [sys.executable, "-m", "enroll_server.cli", *args, "--home", str(self.home)]
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )

    def start(self, est_port: int, http_port: int, mqtt_port: int) -> None:
        self.server = self._spawn("serve", "serve", "--no-broker")
        self.mqtt_port = mqtt_port
        self.start_broker()
        _wait_listening(self.server, "fleetpki serve", [est_port, http_port])

    def start_broker(self) -> None:
        self._broker_runs += 1
        self.broker = self._spawn(f"broker-{self._broker_runs}", "broker")
        _wait_listening(self.broker, "fleetpki broker", [self.mqtt_port])

    def stop_broker(self) -> None:
        if self.broker is not None:
            _stop(self.broker)
            self.broker = None

    def pids(self, shards: list[int] | None = None) -> dict[str, list[int]]:
        """The processes sampled, by name: the simulator is this one plus its fleet shards."""
        found = {"simulator": [os.getpid(), *(shards or [])]}
        if self.server is not None and self.server.poll() is None:
            found["server"] = [self.server.pid]
        if self.broker is not None and self.broker.poll() is None:
            found["broker"] = [self.broker.pid]
        return found

    def close(self) -> None:
        self.stop_broker()
        if self.server is not None:
            _stop(self.server)
            self.server = None


HEARTBEAT = 0.1  # seconds between the loop-lag heartbeat's wake-ups


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_listening(proc: subprocess.Popen[bytes], what: str, ports: list[int]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    for port in ports:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode} at start")
            with socket.socket() as sock:
                sock.settimeout(1)
                if sock.connect_ex((HOST, port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not listening on {port} after {START_TIMEOUT:.0f} s")
            time.sleep(0.2)


def sample_processes(t: float, pids: dict[str, list[int]], connected: int) -> Sample:
    """RSS and open fds of each named group of processes (summed over the group)."""
    import psutil

    rss: dict[str, int] = {}
    fds: dict[str, int] = {}
    for name, group in pids.items():
        for pid in group:
            try:
                proc = psutil.Process(pid)
                rss[name] = rss.get(name, 0) + proc.memory_info().rss
                fds[name] = fds.get(name, 0) + proc.num_fds()
            except psutil.Error:
                continue
    return Sample(t, rss, fds, connected)


def _home(root: Path) -> tuple[Path, Path, Ports]:
    ports = Ports(est=free_port(), http=free_port(), mqtt=free_port())
    layout = init_temp_home(root, ports, timedelta(days=30), admin_port=free_port())
    return layout.root, layout.config, ports


def _with_validity(config: str, validity: float) -> str:
    """fleetpki.toml with device certificates of `validity` seconds, backdated 2 s."""
    config = re.sub(
        r'(?m)^device_validity = "[^"]*"', f'device_validity = "{validity:.0f}s"', config
    )
    return re.sub(r'(?m)^backdate = "[^"]*"', 'backdate = "2s"', config)


class Soak(Scenario):
    """The soak as a simulator scenario (against the two processes of `Services`)."""

    name = "soak"
    summary = "renewals, revocations and broker restarts for a long time; memory and fds"
    delivery_check = False  # accounted per broker lifetime here instead

    def __init__(self, options: SoakOptions, services: Services) -> None:
        self.options = options
        self.services = services
        self.result = SoakResult(options, options.devices, 0.0)
        # QoS 1 accounting, message by message (simulators/delivery.py has why not counts).
        self.ledger = DeliveryLedger()
        # The harness's own threads for sampling and broker restarts. The loop's default
        # executor is the fleet's: aiomqtt runs every agent's MQTT connect there, and after a
        # broker stop thousands of reconnects queued ahead of the restart (the 2,000-agent
        # run's first restart took 28 s instead of about 1) and of the samples. They must
        # outlive the broker they start: PR_SET_PDEATHSIG (die_with_parent) signals the
        # child when the *thread* that forked it ends. Shut down by close(), after Services.
        self._harness = ThreadPoolExecutor(max_workers=2, thread_name_prefix="soak-harness")

    def close(self) -> None:
        self._harness.shutdown(wait=True)

    async def _aside(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._harness, fn, *args)

    def agent_settings(self, options: SimulationOptions) -> AgentSettings:
        from device_agent.backoff import Backoff
        from simulators.fleet import AgentSettings

        # A broker restart every few minutes: reconnect within seconds, not two minutes.
        return AgentSettings(
            telemetry_interval=options.telemetry_interval,
            mqtt_backoff=Backoff(base=1.0, factor=2.0, cap=10.0),
            on_receipt=self.ledger.acknowledged,
        )

    async def run(self, sim: Simulation) -> Report:
        fleet, observer = sim.fleet, sim.observer
        assert fleet is not None and observer is not None
        opts, result = self.options, self.result
        up = await sim.bring_up()
        begin = sim.seconds()

        def now() -> float:
            return sim.seconds() - begin

        revoked: set[str] = set()
        live = [d for d in fleet.ids]
        ledger = self.ledger
        mono_begin = time.monotonic() - now()
        observer.listeners.append(
            lambda device_id, payload: ledger.seen(
                device_id, message_key(payload), time.monotonic()
            )
        )

        async def settle(within: float) -> None:
            """Until the observer is subscribed and every agent not revoked is connected."""

            def ready() -> bool:
                return observer.subscribed.is_set() and all(
                    sim.journal.trace(d).connected for d in live if fleet.running(d)
                )

            await fleet.wait_until(ready, within, poll=0.2)
            await asyncio.sleep(2.0)

        async def close_segment(segment: Segment, period: int, window: int | None) -> int:
            """Account for one broker lifetime (and the restart window before it); returns the
            ledger period of the restart window that begins now."""
            # Until every message acknowledged in the lifetime has reached the observer, or
            # none has arrived for QUIET s (the observer lags behind a busy broker; it is not
            # loss), 60 s at most.
            following = ledger.begin()  # the acknowledgments from now on are not waited for
            deadline = sim.seconds() + 60.0
            last, last_change = observer.messages, sim.seconds()
            while sim.seconds() < deadline and ledger.outstanding(period):
                await asyncio.sleep(0.2)
                if observer.messages != last:
                    last, last_change = observer.messages, sim.seconds()
                elif sim.seconds() - last_change >= QUIET:
                    break
            mono = time.monotonic()
            count = ledger.close(period, mono)
            segment.acknowledged, segment.received = count.acknowledged, count.received
            segment.lost, segment.lost_by_device = count.lost, count.lost_by_device
            segment.lost_acked_at = [
                round(t - mono_begin, 1) for t in count.lost_acked_at[:LOST_TIMES_KEPT]
            ]
            result.segments.append(segment)
            # The restart window before this lifetime (observer away: reported apart).
            if window is not None:
                gap = ledger.close(window, mono)
                result.window_acknowledged += gap.acknowledged
                result.window_received += gap.received
            # What was acknowledged during the drain belongs to the next restart window.
            return following

        worst_lag = [0.0]

        async def heartbeat() -> None:
            loop = asyncio.get_running_loop()
            while True:
                due = loop.time() + HEARTBEAT
                await asyncio.sleep(HEARTBEAT)
                worst_lag[0] = max(worst_lag[0], loop.time() - due)

        async def sampler() -> None:
            while True:
                pids = self.services.pids(fleet.processes())
                connected = sim.journal.connected_count()
                # The worst of this loop's and the shards' (where the agents are).
                lag, worst_lag[0] = max(worst_lag[0], fleet.take_lag()), 0.0
                sample = await self._aside(sample_processes, now(), pids, connected)
                result.samples.append(sample)
                result.loop_lag.append((sample.t, round(lag, 3)))
                await asyncio.sleep(opts.sample_every - now() % opts.sample_every)

        async def revoker() -> None:
            while True:
                await asyncio.sleep(opts.revoke_every - now() % opts.revoke_every)
                count = max(1, round(opts.revoke_share * opts.devices))
                for device_id in sim.rng.sample(live, min(count, len(live))):
                    sim.revoke(device_id)
                    live.remove(device_id)
                    revoked.add(device_id)
                    result.revocations.append((now(), device_id))

        # Sampling and revocations go on through broker restarts.
        tasks = [asyncio.create_task(f()) for f in (sampler, revoker, heartbeat)]
        segment, period, window = Segment(0.0), ledger.begin(), None
        ledger.close(0, time.monotonic())  # the bring-up's messages are not accounted for
        try:
            while now() + opts.broker_every < opts.duration:
                await asyncio.sleep(opts.broker_every - now() % opts.broker_every)
                window = await close_segment(segment, period, window)
                result.restarts.append(now())
                sim.journal.mark(sim.seconds(), "broker restart")
                await self._aside(self.services.stop_broker)
                await self._aside(self.services.start_broker)
                await settle(60.0)
                segment, period = Segment(now()), ledger.begin()
            await asyncio.sleep(max(0.0, opts.duration - now()))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        pids = self.services.pids(fleet.processes())
        result.samples.append(sample_processes(now(), pids, sim.journal.connected_count()))
        result.seconds = now()

        # Stuck: an agent not revoked that is down (or has stopped) when the rest have been
        # up, a minute at most after the end, and still down ROTATION_GRACE s later. Not one
        # snapshot after a pause: an agent that renews in the meantime is reconnecting with
        # its new certificate, not stuck (the runs of 19:32 and 21:25 counted one such each).
        def down() -> set[str]:
            traces = sim.journal.traces
            return {
                d
                for d in live
                if not traces[d].connected or traces[d].outcome is not Outcome.RUNNING
            }

        await fleet.wait_until(lambda: not down(), 60.0, poll=0.2)
        suspects = down()
        if suspects:
            await fleet.wait_until(lambda: not suspects & down(), ROTATION_GRACE, poll=0.2)
        suspects &= down()
        for device_id in fleet.ids:
            trace = sim.journal.trace(device_id)
            if device_id in revoked:
                if trace.connected:
                    result.revoked_connected.append(device_id)
            elif device_id in suspects:
                result.stuck.append(device_id)
                state, last_error = fleet.describe(device_id)
                result.stuck_detail[device_id] = [
                    state,
                    last_error,
                    trace.outcome.value,
                    round(sim.seconds() - trace.connects[-1], 1) if trace.connects else None,
                    [round(t - begin, 1) for t in trace.disconnects[-3:]],
                    round(trace.renewed[-1] - begin, 1) if trace.renewed else None,
                    [(round(t - begin, 1), why, round(d, 1)) for t, why, d in trace.renew_retries],
                ]
        # The last broker lifetime ends with the fleet switched off: what it acknowledged is
        # all there is to wait for.
        await fleet.stop()
        await close_segment(segment, period, window)
        renewals = {d: len(sim.journal.trace(d).renewed) for d in live}
        result.renewals = sum(len(t.renewed) for t in sim.journal.traces.values())
        result.min_renewals = min(renewals.values(), default=0)
        checks = [
            up,
            Check("no acknowledged telemetry lost", result.lost == 0, f"{result.lost} lost"),
            Check("no agent stuck", not result.stuck, f"{len(result.stuck)} stuck"),
            Check(
                "no revoked agent connected",
                not result.revoked_connected,
                f"{len(result.revoked_connected)} still connected",
            ),
        ]
        return await sim.finish(checks)


async def run_soak(
    options: SoakOptions, on_progress: Callable[[str], Any] | None = None
) -> SoakResult:
    """Run the soak from an empty temporary home to its result; cleans up after itself."""
    folder = Path(tempfile.mkdtemp(prefix="fleetpki-soak-", dir=options.workdir))
    home, config, ports = await asyncio.to_thread(_home, folder / "home")
    services = Services(home, folder)
    scenario: Soak | None = None
    try:
        # The server reads the short device lifetime at its start; the file then goes back to
        # the normal one for what the simulator issues in-process (its observer's service
        # certificate, which must outlive the run).
        normal = config.read_text()
        config.write_text(_with_validity(normal, options.validity))
        await asyncio.to_thread(services.start, ports.est, ports.http, ports.mqtt)
        config.write_text(normal)
        scenario = Soak(options, services)
        sim_options = SimulationOptions(
            devices=options.devices,
            home=home,
            telemetry_interval=options.telemetry_interval,
            max_inflight=options.max_inflight,
            workdir=folder,
            seed=options.seed,
            bring_up_timeout=60.0 + options.devices * 0.2,
            shards=options.shards,
        )
        async with Simulation(sim_options, scenario, narrate=on_progress) as sim:
            scenario.result.report = await scenario.run(sim)
        return scenario.result
    finally:
        await asyncio.to_thread(services.close)
        if scenario is not None:
            scenario.close()
        if not options.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
