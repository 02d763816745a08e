"""`fleetpki demo`: the whole platform in plain words, in under a minute, leaving nothing behind.

A temporary home is initialized, the service and broker start, a factory batch is created, and
every device of it runs a real agent: it enrolls, connects over mutual TLS and streams
telemetry. Then one device is revoked (its session is cut within a second and its reconnect is
refused) and one device with a short certificate renews it with a new key by itself.
"""

from __future__ import annotations

import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from enroll_server.transport.loop import until_stop_signal
from simulators.errors import InvalidOption
from simulators.fleet import AgentSettings
from simulators.report import Report
from simulators.scenarios.base import Scenario
from simulators.simulation import Simulation, SimulationOptions
from simulators.trace import Outcome

if TYPE_CHECKING:
    from simulators.trace import DeviceTrace

RENEWER_VALIDITY = timedelta(seconds=9)
TELEMETRY_INTERVAL = 1.0
DROP_LIMIT_S = 1.0


class DemoScenario(Scenario):
    name = "demo"
    summary = "the demo's story (fleetpki demo)"
    prefix = "demo-"

    def agent_settings(self, options: SimulationOptions) -> AgentSettings:
        return AgentSettings(telemetry_interval=TELEMETRY_INTERVAL)

    async def run(self, sim: Simulation) -> Report:  # pragma: no cover - the demo drives sim
        raise NotImplementedError


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _median(values: list[float]) -> float | None:
    data = sorted(values)
    return data[(len(data) - 1) // 2] if data else None


class Story:
    """Prints numbered steps and remembers whether every promise held."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.step = 0
        self.failures: list[str] = []

    def _print(self, first: str, text: str, style: str | None = None) -> None:
        # Hanging indent, so that each step reads as one paragraph however narrow the terminal.
        width = max(40, min(self.console.width, 100))
        body = textwrap.fill(
            text,
            width=width,
            initial_indent=first,
            subsequent_indent=" " * len(first),
            break_on_hyphens=False,
            break_long_words=False,
        )
        self.console.print(body, style=style, markup=False, highlight=False)

    def say(self, text: str) -> None:
        self.step += 1
        self._print(f"{self.step:>2}. ", text, "bold")

    def expect(self, ok: bool, text: str) -> None:
        self._print("    ok    " if ok else "    FAILED ", text, None if ok else "red")
        if not ok:
            self.failures.append(text)


async def _tell(sim: Simulation, story: Story) -> None:
    fleet = sim.fleet
    stack = sim.stack
    assert fleet is not None and stack is not None and sim.observer is not None
    ids = fleet.ids
    renewer, victim = ids[2], ids[min(6, len(ids) - 1)]
    stack.short_lived(renewer, RENEWER_VALIDITY)
    journal = sim.journal

    story.say(
        f"Starting {len(ids)} device agents in this process: each generates its own key, "
        "enrolls with its one-time token (EST simpleenroll) and connects to the broker with "
        "its new certificate."
    )
    up = await sim.bring_up()
    traces = [journal.trace(d) for d in ids]
    enrolled = [t for t in traces if t.enrolled is not None]
    enroll_p50 = _median([t.enroll_latency or 0.0 for t in enrolled])
    connect_p50 = _median([t.connect_latency or 0.0 for t in enrolled if t.connects])
    story.expect(
        up.passed,
        f"{len(enrolled)}/{len(ids)} enrolled (median {_ms(enroll_p50)} from start to "
        f"certificate); {up.detail} (median {_ms(connect_p50)} from certificate to CONNACK)",
    )

    await fleet.wait_until(lambda: all(t.received > 0 for t in traces), 10.0)
    heard = sum(1 for t in traces if t.received > 0)
    story.say("Telemetry flows: each agent publishes JSON at QoS 1 to devices/<id>/telemetry.")
    story.expect(
        heard == len(ids),
        f"the backend received {sim.observer.messages} messages from {heard}/{len(ids)} devices",
    )

    story.say(
        f"Revoking {victim} (reason: key compromise) in the registry, as "
        f"`fleetpki device revoke {victim}` would, from outside the broker."
    )
    at = sim.revoke(victim)
    vt = journal.trace(victim)
    await fleet.wait_until(lambda: vt.first_disconnect_after(at) is not None, 5.0)
    drop = vt.first_disconnect_after(at)
    latency = None if drop is None else drop - at
    story.expect(
        latency is not None and latency <= DROP_LIMIT_S,
        f"the broker dropped its live session {_ms(latency)} later (promise: within 1 s)",
    )
    await fleet.wait_until(lambda: not fleet.running(victim), 15.0)
    refused = vt.outcome in (Outcome.REVOKED, Outcome.REFUSED) and not any(
        c > at for c in vt.connects
    )
    story.expect(
        refused,
        "its agent reconnected and was refused"
        + (f" ({vt.detail})" if vt.detail else "")
        + f"; it stopped for good (state {vt.outcome})",
    )

    rt = journal.trace(renewer)

    def reconnected_after_renewal(t: DeviceTrace) -> bool:
        return bool(t.renewed) and any(c > t.renewed[0] for c in t.connects)

    story.say(
        f"{renewer} was given a {RENEWER_VALIDITY.total_seconds():.0f}-second certificate; "
        "its agent renews at about 2/3 of the lifetime, by itself."
    )
    await fleet.wait_until(lambda: reconnected_after_renewal(rt), 20.0)
    if reconnected_after_renewal(rt) and rt.enrolled is not None:
        story.expect(
            True,
            f"{rt.renewed[0] - rt.enrolled:.1f} s after enrolling it renewed over EST "
            f"simplereenroll with a fresh key: serial {rt.serials[0][:12]}... -> "
            f"{rt.serials[1][:12]}..., and reconnected to the broker with the new certificate",
        )
    else:
        story.expect(False, f"{renewer} did not renew and reconnect within 20 s")

    others = [journal.trace(d) for d in ids if d not in (victim, renewer)]
    dropped = [t.device_id for t in others if t.disconnects]
    story.say("Meanwhile, the rest of the fleet:")
    story.expect(
        not dropped and all(t.connected for t in others),
        f"the other {len(others)} devices stayed connected the whole time "
        f"({len(dropped)} disconnections)",
    )
    report = await sim.finish([])
    story.expect(
        report.lost == 0 and report.sent > 0,
        f"{report.sent} telemetry messages acknowledged by the broker, {report.received} "
        f"received by the backend, {report.lost} lost",
    )


async def _keep_running(sim: Simulation, console: Console) -> None:
    """Print where the console is and how to log in, then wait for Ctrl-C or SIGTERM: the
    end of this demo, not an interruption (the report and cleanup follow as always)."""
    stack = sim.stack
    assert stack is not None
    token = stack.layout.admin_token.read_text().strip()
    console.print(
        "\n[bold]The demo fleet keeps running.[/bold] Open the web console (its certificate is "
        f"signed by the demo's own CA, {stack.layout.root_cert}: let the browser accept it)",
        highlight=False,
    )
    console.print(f"  console   {stack.console_url}", highlight=False, markup=False)
    console.print(f"  login     {token}", highlight=False, markup=False)
    console.print("            (the admin token of this throwaway home)", highlight=False)
    console.print("Ctrl-C stops the fleet and removes everything.", highlight=False)
    await until_stop_signal()


async def run_demo(
    console: Console,
    *,
    devices: int = 25,
    workdir: Path | None = None,
    keep_running: bool = False,
) -> bool:
    """Tell the demo's story; True if every step did what it promised. `keep_running`: after
    the story, leave the fleet running and print the web console's address and a login until
    Ctrl-C or SIGTERM, then clean up as always."""
    if devices < 7:
        raise InvalidOption("--devices", devices, "the demo needs at least 7 devices")
    began = time.monotonic()
    story = Story(console)
    console.print("[bold]fleetpki demo[/bold]: the whole platform on 127.0.0.1, then cleaned up")
    options = SimulationOptions(
        devices=devices,
        scenario="demo",
        telemetry_interval=TELEMETRY_INTERVAL,
        workdir=workdir,
        bring_up_timeout=40.0,
    )
    sim = Simulation(options, DemoScenario(), narrate=story.say)
    async with sim:
        await _tell(sim, story)
        if keep_running:
            await _keep_running(sim, console)
    folder = sim.folder
    story.say("Stopping every agent, the broker and the service.")
    story.expect(
        folder is not None and not folder.exists(),
        f"removed the temporary folder {folder} (home, bundles, agent state)",
    )
    elapsed = time.monotonic() - began
    if story.failures:
        console.print(
            f"[red]demo FAILED[/red] in {elapsed:.1f} s: {len(story.failures)} step(s) did "
            "not do what they promised (see above)"
        )
        return False
    console.print(f"[green]demo OK[/green] in {elapsed:.1f} s")
    return True
