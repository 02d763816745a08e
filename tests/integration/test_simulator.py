"""The fleet simulator: real agents against the real service and broker; its CLI and bad input."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from enroll_server.registry import Registry
from fleetpki.identity import DeviceId
from simulators.cli import register
from simulators.errors import InvalidDeviceCount, NeedsHostedStack, PortInUse, ServerUnreachable
from simulators.scenarios import get_scenario
from simulators.simulation import Simulation, SimulationOptions, run_simulation
from simulators.stack import Ports
from tests.live_server import LiveServer, make_home

pytestmark = pytest.mark.timeout(90)


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # a callback keeps `simulate` a subcommand
        pass

    return app


def fast(**kw: object) -> SimulationOptions:
    base: dict[str, object] = {"telemetry_interval": 0.5, "duration": 1.0, "seed": 7}
    base.update(kw)
    return SimulationOptions(**base)  # type: ignore[arg-type]


def sim_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "fleetpki-sim-stack"]


async def test_happy_fleet_enrolls_connects_and_delivers(tmp_path: Path) -> None:
    report = await run_simulation(fast(devices=4, scenario="happy", workdir=tmp_path))
    assert report.ok, report.checks
    assert report.enrolled == report.ever_connected == report.connected == 4
    # Every device had its own certificate: 4 distinct enrollments, telemetry from each.
    assert report.enroll_latency.count == 4 and report.connect_latency.count == 4
    assert report.sent >= 4 and report.received == report.sent and report.lost == 0
    assert report.failed_by_reason == {}
    # The temporary folder (home, bundles, agent keys) and the stack's thread are gone.
    assert list(tmp_path.iterdir()) == []
    assert sim_threads() == []


async def test_revoke_drops_within_a_second_and_spares_the_rest(tmp_path: Path) -> None:
    report = await run_simulation(fast(devices=5, scenario="revoke", revoke=2, workdir=tmp_path))
    assert report.ok, report.checks
    revoked = report.extra["revoked"]
    assert len(revoked) == 2
    assert report.revocation_latency.count == 2
    assert report.revocation_latency.max is not None and report.revocation_latency.max < 1.0
    # The two revoked agents stopped (refused at reconnect); the three others stayed up.
    assert report.connected == 3
    assert sum(report.failed_by_reason.values()) == 2
    names = {c.name for c in report.checks if c.passed}
    assert "re-enrollment with the revoked certificate refused" in names


async def test_each_device_has_its_own_key_and_certificate(tmp_path: Path) -> None:
    options = fast(devices=3, scenario="happy", workdir=tmp_path, keep=True)
    async with Simulation(options, get_scenario("happy")) as sim:
        await sim.bring_up()
        assert sim.fleet is not None and sim.registry is not None
        serials = set()
        keys = set()
        for device_id, agent in sim.fleet.agents.items():
            ident = agent.identity
            assert ident is not None
            assert ident.cert.subject.rfc4514_string() == f"CN={device_id}"
            serials.add(ident.cert.serial_number)
            keys.add(ident.key_path.read_bytes())
            # The one-time token was used and deleted from the bundle.
            assert not agent.config.token_file.exists()
            assert agent.config.state_dir.is_relative_to(sim.folder)  # type: ignore[arg-type]
        assert len(serials) == len(keys) == 3
        registered = {
            c.serial for d in sim.fleet.ids for c in sim.registry.certificates_of(DeviceId(d))
        }
        assert serials <= registered
        await sim.finish([])


async def test_against_a_running_deployment(live_stack: LiveServer, tmp_path: Path) -> None:
    home = live_stack.layout.root
    ports = Ports(est=live_stack.handle.est_port, mqtt=live_stack.mqtt_port)
    report = await run_simulation(
        fast(devices=3, scenario="happy", home=home, ports=ports, workdir=tmp_path)
    )
    assert report.ok, report.checks
    # The simulated devices' keys are gone with the temporary folder: their batch is revoked,
    # and so is the observer's service identity (no active residue in someone else's registry).
    with Registry.open(live_stack.layout.registry) as registry:
        states = {d.state.value for d in registry.list_devices() if d.role.value == "device"}
        services = registry.list_devices(role="service")
    assert states == {"revoked"}
    assert [s.device_id.value.startswith("sim-observer-") for s in services] == [True]
    assert {s.state.value for s in services} == {"revoked"}


async def test_scenarios_that_restart_things_refuse_someone_elses_stack(tmp_path: Path) -> None:
    make_home(tmp_path / "home")
    for name in ("broker-restart", "server-outage", "renewal-storm", "expired-cert"):
        with pytest.raises(NeedsHostedStack, match="leave out --home"):
            Simulation(fast(home=tmp_path / "home", scenario=name), get_scenario(name))


def test_cli_refuses_restarting_someone_elses_broker(tmp_path: Path) -> None:
    make_home(tmp_path / "home")
    result = CliRunner().invoke(
        cli(), ["simulate", "--home", str(tmp_path / "home"), "--scenario", "broker-restart"]
    )
    assert result.exit_code == 2 and "stops and restarts the broker" in result.output


async def test_unreachable_server_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    make_home(tmp_path / "home", est_port=free_port(), mqtt_port=free_port())
    work = tmp_path / "work"
    with pytest.raises(ServerUnreachable, match="unreachable") as info:
        await run_simulation(fast(devices=2, home=tmp_path / "home", workdir=work))
    assert "EST server" in str(info.value)
    assert list(work.iterdir()) == []
    assert sim_threads() == []


async def test_port_in_use_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port}.*already in use"):
            await run_simulation(fast(devices=2, ports=Ports(mqtt=port), workdir=tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert sim_threads() == []


@pytest.mark.parametrize("count", [0, -3, 50_001])
def test_invalid_device_count_refused_before_anything_starts(count: int, tmp_path: Path) -> None:
    with pytest.raises(InvalidDeviceCount, match=str(count)):
        Simulation(fast(devices=count, workdir=tmp_path), get_scenario("happy"))
    result = CliRunner().invoke(
        cli(), ["simulate", "--devices", str(count), "--workdir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "invalid device count" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_non_numbers_and_unknown_scenarios(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli(), ["simulate", "--devices", "many"])
    assert result.exit_code == 2 and "Invalid value for '--devices'" in result.output
    result = runner.invoke(cli(), ["simulate", "--scenario", "nope", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown scenario 'nope'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            cli(), ["simulate", "-n", "2", "--est-port", str(port), "--workdir", str(tmp_path)]
        )
    assert result.exit_code == 2
    assert "already in use" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_json_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli(),
        [
            "simulate", "-n", "3", "--json", "--telemetry-interval", "0.5", "--duration", "1",
            "--workdir", str(tmp_path),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["devices"] == 3 and data["enrolled"] == 3
    assert data["latency"]["enroll"]["count"] == 3
    assert data["latency"]["enroll"]["p50_ms"] > 0
    assert data["messages"]["lost"] == 0
    assert len(data["timeline"]["connected"]) == 3
    assert all(c["passed"] for c in data["checks"])


def test_cli_plot_without_matplotlib_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def no_matplotlib(name: str, *args: object) -> object:
        return None if name.split(".")[0] == "matplotlib" else real_find_spec(name, *args)  # type: ignore[arg-type]

    # The dev install has matplotlib (so the plot itself is tested); hide it for this test.
    monkeypatch.setattr(importlib.util, "find_spec", no_matplotlib)
    result = CliRunner().invoke(
        cli(),
        ["simulate", "-n", "2", "--plot", str(tmp_path / "t.png"), "--workdir", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "pip install 'fleetpki[plot]'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_fleetpki_cli_mounts_simulate_and_demo() -> None:
    from enroll_server.cli.app import app

    names = {c.name for c in app.registered_commands}
    assert {"simulate", "demo"} <= names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_plot_draws_the_timeline(tmp_path: Path) -> None:
    from simulators.plot import plot_timeline
    from simulators.report import build_report
    from simulators.trace import Journal

    journal = Journal()
    for i in range(5):
        t = journal.trace(f"dev-{i}")
        t.started, t.enrolled, t.connects = 0.1 * i, 0.2 + 0.1 * i, [0.3 + 0.1 * i, 2.5]
        t.disconnects = [2.0]
    journal.mark(2.0, "broker stopped")
    report = build_report(journal, scenario="broker-restart", duration=3.0)
    out = plot_timeline(report, tmp_path / "timeline.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_mid_run_stops_everything_and_removes_the_folder(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "simulate", "-n", "3", "--duration", "60",
         "--workdir", str(tmp_path)],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        # Wait until the run is under way: its temporary folder holds the bundles.
        while not any(tmp_path.glob("fleetpki-sim-*/bundles")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert list(tmp_path.iterdir()) == []
