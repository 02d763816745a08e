"""Each simulator scenario, run for real with a handful of devices: every check it makes holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.scenarios import scenario_names
from simulators.simulation import SimulationOptions, run_simulation

pytestmark = pytest.mark.timeout(120)


def options(scenario: str, devices: int, tmp_path: Path) -> SimulationOptions:
    return SimulationOptions(
        devices=devices,
        scenario=scenario,
        telemetry_interval=0.5,
        duration=1.0,
        seed=11,
        workdir=tmp_path,
    )


def test_every_scenario_is_covered_here() -> None:
    covered = {"happy", "revoke"} | {
        "renewal-storm", "token-replay", "bad-csr", "expired-cert", "clock-skew",
        "broker-restart", "server-outage",
    }  # fmt: skip
    assert set(scenario_names()) == covered


async def test_renewal_storm(tmp_path: Path) -> None:
    report = await run_simulation(options("renewal-storm", 4, tmp_path))
    assert report.ok, report.checks
    assert report.devices_renewed == 4 and report.renewals >= 8
    assert report.connected == 4 and report.lost == 0


async def test_token_replay(tmp_path: Path) -> None:
    report = await run_simulation(options("token-replay", 3, tmp_path))
    assert report.ok, report.checks
    replays = next(c for c in report.checks if c.name.startswith("every replayed"))
    assert "HTTP 401" in replays.detail
    assert report.connected == 3


async def test_bad_csr(tmp_path: Path) -> None:
    report = await run_simulation(options("bad-csr", 3, tmp_path))
    assert report.ok, report.checks
    refused = [c for c in report.checks if c.name.startswith("bad CSR refused")]
    assert len(refused) == report.extra["sent"] == 7
    assert all(c.detail.startswith("HTTP 400: ") for c in refused)
    assert report.enrolled == report.connected == 3


async def test_expired_cert(tmp_path: Path) -> None:
    report = await run_simulation(options("expired-cert", 2, tmp_path))
    assert report.ok, report.checks
    names = [c.name for c in report.checks]
    assert "the broker refuses an expired certificate" in names
    assert report.connected == 2


async def test_clock_skew(tmp_path: Path) -> None:
    report = await run_simulation(options("clock-skew", 4, tmp_path))
    assert report.ok, report.checks
    assert sorted(report.extra["groups"].values()) == sorted(
        ["on time", "2 min slow", "10 min fast", "booted in 1970"]
    )
    assert report.connected == 4


async def test_broker_restart(tmp_path: Path) -> None:
    report = await run_simulation(options("broker-restart", 6, tmp_path))
    assert report.ok, report.checks
    levels = [n for _, n in report.curve]
    # The curve shows the fleet up, down to zero while the broker is away, and up again.
    assert max(levels) == 6 and 0 in levels and levels[-1] == 6
    assert report.extra["reconnect_after_broker_back"]["count"] == 6


async def test_server_outage(tmp_path: Path) -> None:
    report = await run_simulation(options("server-outage", 4, tmp_path))
    assert report.ok, report.checks
    assert report.extra["due_in_outage"] >= 1
    assert report.connected == 4
