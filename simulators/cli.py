"""`fleetpki simulate` and `fleetpki demo`: options in, a run, a report out, an exit code."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode

T = TypeVar("T")

# 0: every check passed; 1: a scenario check failed; 2: bad input or the stack was unusable.
EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR = ExitCode.OK, ExitCode.FAILED, ExitCode.USAGE

SCENARIO_HELP = (
    "happy | renewal-storm | revoke | token-replay | bad-csr | expired-cert | clock-skew | "
    "broker-restart | server-outage"
)


def quiet_logging(verbose: bool) -> None:
    """Thousands of agents each logging their reconnects would bury the report: by default
    only the simulator's own warnings are shown (the report counts every failure anyway)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for name in ("fleetpki.agent", "asyncio", "amqtt", "enroll_server", "fleetpki"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger("fleetpki.simulator").setLevel(logging.WARNING)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (server extra): thousands of agents' TLS and timers cost
    less CPU on it. A factory, not a global policy, so nothing else in the process changes."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_cancellable(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with SIGTERM treated like Ctrl-C: the run's cleanup still happens."""

    async def main() -> T:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on this OS
            pass
        return await task

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())


def simulate(
    devices: Annotated[
        int, typer.Option("--devices", "-n", help="How many simulated devices (1..50,000).")
    ] = 10,
    scenario: Annotated[str, typer.Option(help=SCENARIO_HELP)] = "happy",
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="Run against the `fleetpki serve` of this home (default: start a private "
            "service and broker in a temporary home).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also draw the enroll/connect timeline to this PNG (needs matplotlib)."),
    ] = None,
    ramp: Annotated[
        float | None,
        typer.Option(help="Start this many agents per second (default: all at once)."),
    ] = None,
    max_inflight: Annotated[
        int | None,
        typer.Option(help="At most this many agents enrolling or connecting at once."),
    ] = None,
    shards: Annotated[
        int,
        typer.Option(help="Run the agents in this many processes (1..64; 1: this one)."),
    ] = 1,
    telemetry_interval: Annotated[
        float, typer.Option(help="Seconds between telemetry messages of each device.")
    ] = 2.0,
    duration: Annotated[
        float, typer.Option(help="Seconds the scenario keeps the fleet streaming.")
    ] = 4.0,
    revoke: Annotated[int, typer.Option(help="Devices the revoke scenario revokes.")] = 1,
    key_type: Annotated[str, typer.Option(help="Device key type.")] = "ec-p256",
    est_port: Annotated[int, typer.Option(help="EST port (own stack: 0 = any free).")] = 0,
    mqtt_port: Annotated[int, typer.Option(help="MQTT port (own stack: 0 = any free).")] = 0,
    http_port: Annotated[int, typer.Option(help="CRL/OCSP port (own stack: 0 = any free).")] = 0,
    workdir: Annotated[
        Path | None, typer.Option(help="Parent folder of the run's temporary folder.")
    ] = None,
    keep: Annotated[
        bool, typer.Option(help="Keep the temporary folder (bundles, agent state) afterwards.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Random seed, to repeat a run.")] = None,
    bring_up_timeout: Annotated[
        float | None, typer.Option(help="Seconds allowed for the fleet to come up.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show agent logs.")] = False,
    list_scenarios: Annotated[
        bool, typer.Option("--list", help="List the scenarios and what each verifies.")
    ] = False,
) -> None:
    """Run N real device agents (own key, token, certificate, mTLS session each) in one
    process (or --shards processes) through a scenario, and report what happened."""
    from simulators.errors import SimulatorError
    from simulators.plot import check_plot_available, plot_timeline
    from simulators.report import as_json as report_json
    from simulators.report import render
    from simulators.simulation import SimulationOptions, preflight, run_simulation
    from simulators.stack import Ports

    err = Console(stderr=True, soft_wrap=True)
    out = stdout_console()
    if list_scenarios:
        from simulators.scenarios import SCENARIOS

        for name, cls in SCENARIOS.items():
            where = "own stack only" if cls.hosted_only else "own stack or --home"
            out.print(f"[bold]{name}[/bold] ({where})\n  {cls.summary}\n", highlight=False)
        raise typer.Exit(EXIT_OK)
    quiet_logging(verbose)
    try:
        options = SimulationOptions(
            devices=devices,
            scenario=scenario,
            home=home,
            ramp=ramp,
            max_inflight=max_inflight,
            shards=shards,
            telemetry_interval=telemetry_interval,
            duration=duration,
            revoke=revoke,
            key_type=key_type,
            ports=Ports(est=est_port, http=http_port, mqtt=mqtt_port),
            workdir=workdir,
            keep=keep,
            seed=seed,
            bring_up_timeout=bring_up_timeout,
        )
        preflight(options)
        if plot is not None:
            check_plot_available()
        if not as_json:
            where = f"the deployment of {home}" if home else "a private service and broker"
            err.print(f"simulating {devices:,} devices, scenario {scenario}, against {where}...")
        report = run_cancellable(run_simulation(options))
    except SimulatorError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("interrupted; everything the run started has been stopped")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    if as_json:
        sys.stdout.write(json.dumps(report_json(report), indent=2) + "\n")
    else:
        render(report, out)
    if plot is not None:
        try:
            plot_timeline(report, plot)
        except SimulatorError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_ERROR) from None
        if not as_json:
            err.print(f"timeline drawn to {plot}")
    raise typer.Exit(EXIT_OK if report.ok else EXIT_CHECK_FAILED)


def demo(
    devices: Annotated[int, typer.Option(help="Devices in the demo's factory batch.")] = 25,
    workdir: Annotated[
        Path | None, typer.Option(help="Parent folder of the demo's temporary home.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show agent logs.")] = False,
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running",
            help="After the story, leave the fleet running and print the web console's URL "
            "and a login; Ctrl-C stops and removes everything.",
        ),
    ] = False,
) -> None:
    """The whole platform in under a minute: init, serve, a factory batch, 25 agents enroll
    and stream telemetry, one is revoked and cut off, one renews; then everything is removed."""
    from simulators.demo import run_demo
    from simulators.errors import SimulatorError

    quiet_logging(verbose)
    console = Console(highlight=False)
    try:
        ok = run_cancellable(
            run_demo(console, devices=devices, workdir=workdir, keep_running=keep_running)
        )
    except SimulatorError as exc:
        Console(stderr=True, soft_wrap=True).print(
            f"[red]error:[/red] {escape(str(exc))}", highlight=False
        )
        raise typer.Exit(EXIT_ERROR) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("interrupted; everything the demo started has been stopped and removed")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    raise typer.Exit(EXIT_OK if ok else EXIT_CHECK_FAILED)


def register(app: typer.Typer) -> None:
    """Mount `simulate` and `demo` on the `fleetpki` app (called by enroll_server.cli.app)."""
    app.command("simulate")(simulate)
    app.command("demo")(demo)
