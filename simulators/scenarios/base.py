"""What a scenario is: stack settings, agent settings, and a script that ends in a report."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, ClassVar

from simulators.fleet import AgentSettings

if TYPE_CHECKING:
    from simulators.report import Report
    from simulators.simulation import Simulation, SimulationOptions


class Scenario:
    """Base class. Subclasses set `name` and `summary` and implement `run`.

    `hosted_only`: why the scenario needs the simulator's own stack (it restarts the broker,
    shortens certificate lifetimes...), or None if it can run against any deployment.
    `in_process_only`: why the scenario needs its agents in the simulator's own process (it
    reaches into their objects), or None if they may run in fleet shards (`--shards`).
    `delivery_check`: whether to check at the end that no acknowledged message was lost.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    hosted_only: ClassVar[str | None] = None
    in_process_only: ClassVar[str | None] = None
    delivery_check: ClassVar[bool] = True
    prefix: ClassVar[str | None] = None  # device id prefix; None: a fresh one per run

    def validity(self, options: SimulationOptions) -> timedelta:
        """Lifetime of the certificates the self-hosted stack issues."""
        return timedelta(days=30)

    def backdate(self, options: SimulationOptions) -> timedelta:
        # Production's 5 minutes: devices whose clocks lag a little still accept their cert.
        return timedelta(minutes=5)

    def agent_settings(self, options: SimulationOptions) -> AgentSettings:
        return AgentSettings(telemetry_interval=options.telemetry_interval)

    async def run(self, sim: Simulation) -> Report:
        raise NotImplementedError
