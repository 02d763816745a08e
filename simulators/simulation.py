"""One simulation run: stack (own or existing), factory batch, observer, fleet, then cleanup.

`Simulation` is an async context manager: entering builds everything a scenario needs,
leaving stops every agent, the observer and (if ours) the service and broker, and deletes the
temporary folder, whatever happened in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from enroll_server.home.config import load_config as load_server_config
from enroll_server.home.layout import HomeLayout, registry_location
from enroll_server.registry import Registry
from fleetpki.identity import DeviceId
from simulators.errors import (
    InvalidDeviceCount,
    InvalidOption,
    NeedsHostedStack,
    NeedsLocalAgents,
    ServerUnreachable,
    SimulatorError,
)
from simulators.fleet import AgentSettings, Fleet, FleetBase
from simulators.observer import Observer, issue_observer
from simulators.report import Check, Report, build_report
from simulators.sharded_fleet import ShardedFleet
from simulators.stack import Endpoints, HostedStack, Ports, existing_endpoints, probe_tls
from simulators.trace import Journal

if TYPE_CHECKING:
    from simulators.scenarios.base import Scenario

log = logging.getLogger("fleetpki.simulator")

MAX_DEVICES = 50_000
MAX_SHARDS = 64


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    """What `fleetpki simulate` was asked for."""

    devices: int = 10
    scenario: str = "happy"
    home: Path | None = None  # a running `fleetpki serve --home`; None: start our own stack
    ramp: float | None = None  # agents started per second; None: all at once
    telemetry_interval: float = 2.0
    duration: float = 4.0  # seconds of steady streaming the scenario holds
    key_type: str = "ec-p256"
    ports: Ports = field(default_factory=Ports)
    workdir: Path | None = None  # parent of the temporary folder
    keep: bool = False  # keep the temporary folder (bundles, agent state) for inspection
    seed: int | None = None
    bring_up_timeout: float | None = None  # default: grows with the device count
    revoke: int = 1  # devices the revoke scenario revokes
    max_inflight: int | None = None  # at most this many agents enrolling/connecting at once
    shards: int = 1  # processes the agents run in; 1: this one (simulators/sharded_fleet.py)

    def up_timeout(self) -> float:
        if self.bring_up_timeout is not None:
            return self.bring_up_timeout
        # Enrollment runs at some hundreds per second on a small machine; be generous.
        return 30.0 + self.devices * 0.05 + (self.devices / self.ramp if self.ramp else 0.0)


def check_options(options: SimulationOptions) -> None:
    """Refuse unusable options before anything is started."""
    n = options.devices
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DEVICES:
        raise InvalidDeviceCount(n, MAX_DEVICES)
    if not 1 <= options.shards <= MAX_SHARDS:
        raise InvalidOption("--shards", options.shards, f"must be 1..{MAX_SHARDS}")
    if options.max_inflight is not None and options.max_inflight < 1:
        raise InvalidOption("--max-inflight", options.max_inflight, "must be at least 1")
    if options.ramp is not None and not options.ramp > 0:
        raise InvalidOption("--ramp", options.ramp, "must be a positive number of devices/s")
    if not options.telemetry_interval >= 0.05:
        raise InvalidOption(
            "--telemetry-interval", options.telemetry_interval, "must be at least 0.05 s"
        )
    if not options.duration >= 0:
        raise InvalidOption("--duration", options.duration, "must not be negative")
    for name, port in (("--est-port", options.ports.est), ("--mqtt-port", options.ports.mqtt)):
        if not 0 <= port <= 65535:
            raise InvalidOption(name, port, "must be a port number 0..65535")
    if options.home is not None and not (options.home / "fleetpki.toml").exists():
        raise SimulatorError(
            f"{options.home}: not a fleetpki home (no fleetpki.toml); run `fleetpki init` "
            f"there, or leave out --home to let the simulator start its own"
        )


def preflight(options: SimulationOptions) -> Scenario:
    """Every refusal that needs no network: options, scenario name, scenario vs --home."""
    from simulators.scenarios import get_scenario

    check_options(options)
    scenario = get_scenario(options.scenario)
    if options.home is not None and scenario.hosted_only:
        raise NeedsHostedStack(scenario.name, scenario.hosted_only)
    if options.shards > 1 and scenario.in_process_only:
        raise NeedsLocalAgents(scenario.name, scenario.in_process_only)
    return scenario


class Simulation:
    """Everything one run owns. Scenarios drive it through `fleet`, `revoke`, `stack`..."""

    def __init__(
        self,
        options: SimulationOptions,
        scenario: Scenario,
        narrate: Callable[[str], None] | None = None,
    ) -> None:
        check_options(options)
        if options.home is not None and scenario.hosted_only:
            raise NeedsHostedStack(scenario.name, scenario.hosted_only)
        if options.shards > 1 and scenario.in_process_only:
            raise NeedsLocalAgents(scenario.name, scenario.in_process_only)
        self.options = options
        self.scenario = scenario
        self.seed = options.seed if options.seed is not None else secrets.randbits(32)
        self.rng = random.Random(self.seed)
        self.journal = Journal()
        self._t0 = time.monotonic()
        self.folder: Path | None = None
        self.stack: HostedStack | None = None
        self.layout: HomeLayout | None = None
        self.endpoints: Endpoints | None = None
        self.registry: Registry | None = None
        self.observer: Observer | None = None
        self._observer_task: asyncio.Task[None] | None = None
        self.fleet: FleetBase | None = None
        self.batch_id: str | None = None
        self.bundle_dir: Path | None = None
        self.notes: list[str] = []  # plain-words log of what the run did (demo, --verbose)
        self._narrate = narrate

    def seconds(self) -> float:
        """Seconds since the run began (monotonic)."""
        return time.monotonic() - self._t0

    # -- setup ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Simulation:
        try:
            await self._setup()
        except BaseException:
            await self._teardown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._teardown()

    async def _setup(self) -> None:
        opts = self.options
        parent = opts.workdir
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="fleetpki-sim-", dir=parent))
        if opts.home is None:
            self.stack = await asyncio.to_thread(
                HostedStack.start,
                self.folder / "home",
                validity=self.scenario.validity(opts),
                backdate=self.scenario.backdate(opts),
                ports=opts.ports,
            )
            self.layout, self.endpoints = self.stack.layout, self.stack.endpoints
            ep = self.endpoints
            self.note(
                f"fleetpki init: a temporary home {self.layout.root} with a root CA, an issuing "
                "CA, a TLS server certificate and an empty registry"
            )
            self.note(
                f"fleetpki serve: EST (RFC 7030) on {ep.est_url}, CRL/OCSP on "
                f"http://{ep.host}:{ep.http_port}, MQTT broker (mutual TLS) on "
                f"{ep.host}:{ep.mqtt_port}"
            )
        else:
            self.layout, self.endpoints = existing_endpoints(opts.home, opts.ports)
            await self._probe(self.layout, self.endpoints)
        self.registry = Registry.open(registry_location(self.layout))
        await self._start_observer()
        await self._create_batch()

    async def _probe(self, layout: HomeLayout, ep: Endpoints) -> None:
        await probe_tls("EST server", ep.host, ep.est_port, layout.root_cert, within=5)
        try:
            async with asyncio.timeout(5):
                _, writer = await asyncio.open_connection(ep.host, ep.mqtt_port)
        except (OSError, TimeoutError) as exc:
            raise ServerUnreachable(
                "MQTT broker", f"{ep.host}:{ep.mqtt_port}", str(exc) or type(exc).__name__
            ) from exc
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def _start_observer(self) -> None:
        assert self.folder is not None and self.layout is not None and self.endpoints is not None
        name = f"sim-observer-{secrets.token_hex(3)}"
        identity = await asyncio.to_thread(
            issue_observer, self.layout.root, name, self.folder / "observer"
        )
        self.observer = Observer(
            self.endpoints.host, self.endpoints.mqtt_port, identity, name, self.journal
        )
        self._observer_task = asyncio.create_task(self.observer.run(), name="observer")
        if not await self.observer.wait_subscribed(10):
            raise ServerUnreachable(
                "MQTT broker",
                f"{self.endpoints.host}:{self.endpoints.mqtt_port}",
                "the telemetry observer could not subscribe within 10 s",
            )
        self.note(
            f"fleetpki service issue {name}: a backend identity, subscribed over mTLS to "
            "devices/+/telemetry"
        )

    async def _create_batch(self) -> None:
        from provisioning.batch import BatchRequest, create_batch

        assert self.folder is not None and self.layout is not None and self.registry is not None
        now = datetime.now(UTC)
        prefix = self.scenario.prefix or f"sim{secrets.token_hex(3)}-"
        self.batch_id = f"sim-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        self.bundle_dir = self.folder / "bundles"
        request = BatchRequest(
            count=self.options.devices,
            prefix=prefix,
            out_dir=self.bundle_dir,
            batch_id=self.batch_id,
            token_ttl=timedelta(days=1),
            note=f"fleetpki simulate --scenario {self.scenario.name}",
            device_key_type=self.options.key_type,
        )
        config = load_server_config(self.layout.config)
        layout, registry = self.layout, self.registry
        # The batch is written from this thread's registry connection (sqlite objects stay in
        # their thread), so the loop blocks for the batch: nothing else runs yet.
        create_batch(registry, layout, config, request, now=now, actor="simulator")
        bundles = {
            d.name: d / "agent.toml"
            for d in sorted(self.bundle_dir.iterdir())
            if (d / "agent.toml").is_file()
        }
        self.note(
            f"fleetpki batch create --count {len(bundles)}: factory batch {self.batch_id}, one "
            f"bundle per device (agent.toml, ca.pem, one-time token) in {self.bundle_dir}"
        )
        settings = self.scenario.agent_settings(self.options)
        settings.endpoints = self.endpoints
        if self.options.shards > 1:
            sharded = ShardedFleet(
                bundles,
                self.journal,
                self.seconds,
                settings,
                self.rng,
                self.options.shards,
                self.folder / "shards",
            )
            self.fleet = sharded
            await sharded.open()
            self.note(f"the agents run in {self.options.shards} processes (fleet shards)")
        else:
            self.fleet = Fleet(bundles, self.journal, self.seconds, settings, self.rng)

    # -- actions for scenarios -------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        assert self.fleet is not None
        return self.fleet.ids

    @property
    def local_fleet(self) -> Fleet:
        """The fleet, for scenarios that reach into the agents themselves (their objects, their
        configuration): only when they run in this process."""
        if not isinstance(self.fleet, Fleet):
            why = self.scenario.in_process_only or "reaches into the agents' objects"
            raise NeedsLocalAgents(self.scenario.name, why)
        return self.fleet

    def revoke(self, device_id: str, reason: str = "keyCompromise") -> float:
        """Revoke a device in the registry as an operator's CLI would; returns when (t)."""
        assert self.registry is not None
        t = self.seconds()
        self.registry.revoke_device(
            DeviceId(device_id), reason=reason, now=datetime.now(UTC), actor="simulator"
        )
        self.journal.revoked_at[device_id] = t
        self.journal.mark(t, f"revoke {device_id}")
        return t

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("%s", text)
        if self._narrate is not None:
            self._narrate(text)

    async def bring_up(self, ids: list[str] | None = None) -> Check:
        """Start agents (at the ramp rate) and wait until each is connected or has stopped."""
        fleet = self.fleet
        assert fleet is not None
        chosen = fleet.ids if ids is None else ids
        await fleet.start(chosen, self.options.ramp, self.options.max_inflight)
        await fleet.wait_settled(self.options.up_timeout())
        up = len(fleet.connected(chosen))
        return Check(
            "every device enrolled and connected",
            up == len(chosen),
            f"{up:,}/{len(chosen):,} connected over mTLS",
        )

    async def hold(self, seconds: float) -> None:
        """Let the fleet stream telemetry for a while."""
        await asyncio.sleep(seconds)

    # -- finishing -----------------------------------------------------------------------------
    async def finish(self, checks: list[Check], **kwargs: Any) -> Report:
        """Stop every agent, let the observer drain, and build the report."""
        fleet = self.fleet
        assert fleet is not None and self.observer is not None
        duration = self.seconds()
        connected = self.journal.connected_count()
        await fleet.stop()
        fleet.sync_counts()
        # QoS 1: the broker acknowledged each counted message; let its fan-out to the observer
        # arrive before calling anything lost: until all arrived, or nothing more arrives.
        await self._drain(self.observer)
        traces = self.journal.traces.values()
        if self.scenario.delivery_check:
            lost = sum(max(0, t.sent - t.received) for t in traces)
            sent = sum(t.sent for t in traces)
            checks.append(
                Check(
                    "no acknowledged telemetry lost",
                    lost == 0 and sent > 0,
                    f"{sent:,} sent (PUBACKed), {lost:,} never reached the observer",
                )
            )
        return build_report(
            self.journal,
            scenario=self.scenario.name,
            duration=duration,
            checks=checks,
            connected=connected,
            extra={"seed": self.seed, **kwargs.pop("extra", {})},
            **kwargs,
        )

    async def _drain(self, observer: Observer, quiet: float = 2.0, limit: float = 30.0) -> None:
        traces = self.journal.traces.values()
        sent = sum(t.sent for t in traces)
        deadline = self.seconds() + limit
        last, last_change = observer.messages, self.seconds()
        while self.seconds() < deadline:
            if sum(t.received for t in traces) >= sent:
                return
            await asyncio.sleep(0.2)
            if observer.messages != last:
                last, last_change = observer.messages, self.seconds()
            elif self.seconds() - last_change >= quiet:
                return

    async def _teardown(self) -> None:
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                await self.fleet.stop(grace=10)
        if self._observer_task is not None:
            self._observer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._observer_task
        if self.registry is not None:
            if self.stack is None:
                self._revoke_our_identities(self.registry)
            self.registry.close()
        if self.stack is not None:
            await asyncio.to_thread(self.stack.close)
        if self.folder is not None and not self.options.keep:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _revoke_our_identities(self, registry: Registry) -> None:
        """On someone else's deployment: the simulated devices' keys and the observer's die
        with our temporary folder, so their certificates must not stay valid, and no active
        identity of ours stays behind in that registry."""
        now = datetime.now(UTC)
        if self.batch_id is not None:
            with contextlib.suppress(Exception):
                registry.revoke_batch(
                    self.batch_id, reason="cessationOfOperation", now=now, actor="simulator"
                )
        if self.observer is not None:
            with contextlib.suppress(Exception):
                registry.revoke_device(
                    DeviceId(self.observer.name),
                    reason="cessationOfOperation",
                    now=now,
                    actor="simulator",
                )


async def run_simulation(options: SimulationOptions) -> Report:
    """Run one scenario from start to report (the engine of `fleetpki simulate`)."""
    from simulators.scenarios import get_scenario

    scenario = get_scenario(options.scenario)
    async with Simulation(options, scenario) as sim:
        return await scenario.run(sim)


def settings_with(base: AgentSettings, **changes: Any) -> AgentSettings:
    from dataclasses import replace

    return replace(base, **changes)
