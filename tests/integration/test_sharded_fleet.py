"""A fleet in several processes (simulators/sharded_fleet.py): the same run, the same journal."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from simulators.errors import InvalidOption, NeedsLocalAgents
from simulators.scenarios import get_scenario
from simulators.sharded_fleet import ShardedFleet
from simulators.simulation import Simulation, SimulationOptions, preflight, run_simulation
from simulators.trace import Outcome

pytestmark = pytest.mark.timeout(120)


def fast(**kw: object) -> SimulationOptions:
    base: dict[str, object] = {"telemetry_interval": 0.5, "duration": 1.0, "seed": 7}
    base.update(kw)
    return SimulationOptions(**base)  # type: ignore[arg-type]


async def test_happy_fleet_in_two_shards(tmp_path: Path) -> None:
    report = await run_simulation(fast(devices=6, scenario="happy", shards=2, workdir=tmp_path))
    assert report.ok, report.checks
    # Enrollment and connect times come from the shards' events, in this run's clock.
    assert report.enrolled == report.ever_connected == report.connected == 6
    assert report.enroll_latency.count == 6 and report.connect_latency.count == 6
    assert report.enroll_latency.max is not None and 0 < report.enroll_latency.max < 60
    # Acknowledged counts come back when the shards stop; the observer is in this process.
    assert report.sent >= 6 and report.received == report.sent and report.lost == 0
    assert list(tmp_path.iterdir()) == []


async def test_a_dead_shard_ends_its_agents_and_the_run_goes_on(tmp_path: Path) -> None:
    options = fast(devices=4, shards=2, workdir=tmp_path)
    async with Simulation(options, get_scenario("happy")) as sim:
        fleet = sim.fleet
        assert isinstance(fleet, ShardedFleet)
        assert (await sim.bring_up()).passed
        pids = fleet.processes()
        assert len(pids) == 2 and os.getpid() not in pids
        os.kill(pids[0], signal.SIGKILL)
        victims = [d for i, d in enumerate(fleet.ids) if i % 2 == 0]
        survivors = [d for d in fleet.ids if d not in victims]
        assert await fleet.wait_until(lambda: not any(map(fleet.running, victims)), 10)
        for device_id in victims:
            trace = sim.journal.trace(device_id)
            assert (trace.outcome, trace.reason) == (Outcome.FAILED, "crash:shard")
            assert not trace.connected and "exited with status -9" in (trace.detail or "")
        assert all(map(fleet.running, survivors)) and fleet.connected(survivors) == survivors
        await asyncio.sleep(1.0)  # the other shard's agents still stream
        await fleet.stop()
        assert fleet.processes() == []
        # Scenarios that reach into agent objects refuse a sharded fleet by name.
        with pytest.raises(NeedsLocalAgents, match="leave out --shards"):
            sim.local_fleet


def test_scenarios_that_reach_into_agents_refuse_shards_before_starting() -> None:
    with pytest.raises(NeedsLocalAgents, match="re-enrolls with a revoked agent's own key"):
        preflight(fast(scenario="revoke", shards=2))
    with pytest.raises(InvalidOption, match="--shards"):
        preflight(fast(shards=0))
    assert preflight(fast(scenario="broker-restart", shards=4)).name == "broker-restart"
