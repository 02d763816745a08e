"""Benchmark: how many real agents one simulator process holds connected, and the whole stack's
end-to-end enrollment rate (ramped until errors appear: the knee).

    .venv/bin/python bench/simulate.py [--devices 5000] [--ramp R] [--hold 30]
                                       [--rates 20,40,80,160,320] [--step-seconds 5]
                                       [--json bench/results/simulate.json] [--time-limit 900]

The stack is a real `fleetpki serve` process (EST + CRL/OCSP + the embedded mTLS broker, as an
operator runs it; its home and registry on disk). The simulator is this process: one asyncio
loop (uvloop when installed), N real `device_agent.Agent`s, each with its own key, one-time
token, certificate and mutual-TLS MQTT session; agent state folders live on /dev/shm when it
exists (a device has its own flash; the benchmark is not about this machine's disk).

Phase 1 (concurrency, run second): a factory batch of --devices agents brought up with at most
--max-inflight of them enrolling or connecting at once (a closed loop: as fast as the stack
takes them, never so fast that connects time out and retry into a storm);
once all are up they are held --hold seconds while we sample, every few seconds, the sessions
we believe connected, the ESTABLISHED TCP connections the broker process really holds on its
MQTT port, this process's RSS, open files and CPU.

Phase 2 (enrollment rate, run first): for each offered rate R in --rates, a fresh batch of
R x --step-seconds agents is started at R per second; we measure the achieved enrollment
throughput, enroll latency p50/p95/p99, retries (5xx, timeouts, 429) and failures, and the CPU
of both processes. Stepping stops at the first rate with errors or below 90% of the offer; the
knee is the last clean rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_agent.events import AgentEvent, EventKind  # noqa: E402
from enroll_server.transport.loop import install_fast_loop  # noqa: E402
from simulators.report import percentiles  # noqa: E402
from simulators.scenarios import get_scenario  # noqa: E402
from simulators.simulation import Simulation, SimulationOptions  # noqa: E402
from simulators.stack import Ports, free_port  # noqa: E402

MQTT_KEEPALIVE_NOTE = "agents' default keepalive (30 s)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class RetryCounter:
    """A fleet listener counting the agents' retry events (each an error they absorbed), by
    what was retried and why."""

    def __init__(self) -> None:
        self.enroll_retries = 0
        self.mqtt_retries = 0
        self.reasons: Counter[str] = Counter()

    def __call__(self, device_id: str, event: AgentEvent) -> None:
        if event.kind is not EventKind.RETRY:
            return
        if event.what == "enroll":
            self.enroll_retries += 1
        elif event.what == "mqtt":
            self.mqtt_retries += 1
        self.reasons[f"{event.what}: {_short(event.why)}"] += 1


def _short(why: object) -> str:
    text = str(why)
    return text[:80]


class LoopErrors:
    """The loop's exception handler: counts what asyncio would print (aiomqtt's internals
    raise into callbacks when a connect is cancelled) instead of flooding the terminal."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.counts[type(exc).__name__ if exc else str(context.get("message"))[:60]] += 1


# -- the stack: `fleetpki serve` in its own process ------------------------------------------
def init_home(home: Path, ports: Ports) -> None:
    cmd = [
        sys.executable, "-m", "enroll_server.cli", "init", "--home", str(home),
        "--est-port", str(ports.est), "--http-port", str(ports.http),
        "--mqtt-port", str(ports.mqtt), "--public-host", "127.0.0.1",
        "--admin-port", str(free_port()),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def start_serve(home: Path, ports: Ports, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(home)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + 30
    for port in (ports.est, ports.mqtt):
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    stop_serve(proc)
                    raise SystemExit(f"fleetpki serve did not start; see {log}") from None
                time.sleep(0.1)
    return proc


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies, so no server outlives it (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def broker_sessions(server: psutil.Process, mqtt_port: int) -> int:
    """ESTABLISHED TCP connections the broker process holds on its MQTT port."""
    return sum(
        1
        for c in server.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == mqtt_port and c.status == psutil.CONN_ESTABLISHED
    )


# -- phase 1 -------------------------------------------------------------------------------
async def concurrency(
    home: Path,
    ports: Ports,
    server: psutil.Process,
    args: argparse.Namespace,
    work: Path,
    retries: RetryCounter,
) -> dict[str, Any]:
    me = psutil.Process()
    options = SimulationOptions(
        devices=args.devices,
        scenario="happy",
        home=home,
        ports=ports,
        ramp=args.ramp,
        max_inflight=args.max_inflight,
        telemetry_interval=args.telemetry_interval,
        workdir=work,
        seed=1,
        # Generous: other work on the machine may take CPU; the time limit still bounds us.
        bring_up_timeout=max(600.0, 3 * args.devices / (args.ramp or 10.0)),
    )
    rss0 = me.memory_info().rss
    load0 = round(os.getloadavg()[0], 2)
    fds0 = me.num_fds()
    pace = f"{args.ramp:g}/s" if args.ramp else "as fast as the stack takes them"
    print(
        f"phase 1: {args.devices:,} agents, {pace}, at most {args.max_inflight} in flight ...",
        flush=True,
    )
    async with Simulation(options, get_scenario("happy")) as sim:
        assert sim.fleet is not None
        fleet = sim.fleet
        fleet.listeners.append(retries)
        cpu0, scpu0, t0 = me.cpu_times(), server.cpu_times(), time.monotonic()
        up = await sim.bring_up()
        t_up = time.monotonic() - t0
        ours = len(fleet.connected())
        print(f"  {up.detail} after {t_up:.1f} s", flush=True)
        samples = []
        cpu1, scpu1, h0 = me.cpu_times(), server.cpu_times(), time.monotonic()
        end = h0 + args.hold
        while time.monotonic() < end:
            await asyncio.sleep(min(5.0, max(0.0, end - time.monotonic())))
            sample = {
                "t": round(time.monotonic() - t0, 1),
                "connected_sim": len(fleet.connected()),
                "established_broker": broker_sessions(server, ports.mqtt),
                "rss_mib": round(me.memory_info().rss / 2**20, 1),
                "fds": me.num_fds(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            samples.append(sample)
            print(f"  {sample}", flush=True)
        held = time.monotonic() - h0
        cpu2, scpu2 = me.cpu_times(), server.cpu_times()
        report = await sim.finish([up])
    peak = max((s["established_broker"] for s in samples), default=0)
    least = min((s["connected_sim"] for s in samples), default=0)
    rss_peak = max((s["rss_mib"] for s in samples), default=0.0)
    return {
        "devices": args.devices,
        "ramp_per_s": args.ramp,
        "max_inflight": args.max_inflight,
        "load_avg_1m_at_start": load0,
        "telemetry_interval_s": args.telemetry_interval,
        "all_connected": up.passed,
        "connected_after_bring_up": ours,
        "bring_up_s": round(t_up, 1),
        "held_s": round(held, 1),
        "min_connected_while_held": least,
        "peak_broker_sessions": peak,  # includes the observer's service session
        "sim_rss_mib": rss_peak,
        "sim_rss_per_agent_kib": round((rss_peak * 2**20 - rss0) / max(1, ours) / 1024, 1),
        "sim_fds": max((s["fds"] for s in samples), default=0),
        "sim_fds_per_agent": round(
            (max((s["fds"] for s in samples), default=fds0) - fds0) / max(1, ours), 2
        ),
        "sim_cpu_bring_up_s": round(_cpu(cpu1) - _cpu(cpu0), 1),
        "server_cpu_bring_up_s": round(_cpu(scpu1) - _cpu(scpu0), 1),
        "sim_cpu_idle_pct": round(100 * (_cpu(cpu2) - _cpu(cpu1)) / max(held, 1e-9), 1),
        "server_cpu_idle_pct": round(100 * (_cpu(scpu2) - _cpu(scpu1)) / max(held, 1e-9), 1),
        "enroll_latency": report.enroll_latency.as_json(),
        "connect_latency": report.connect_latency.as_json(),
        "telemetry": {"sent": report.sent, "received": report.received, "lost": report.lost},
        "failed_by_reason": report.failed_by_reason,
        "samples": samples,
    }


def _cpu(t: Any) -> float:
    return float(t.user + t.system)


# -- phase 2 -------------------------------------------------------------------------------
async def rate_step(
    home: Path,
    ports: Ports,
    server: psutil.Process,
    rate: float,
    args: argparse.Namespace,
    work: Path,
    retries: RetryCounter,
) -> dict[str, Any]:
    count = max(20, min(args.max_step_devices, round(rate * args.step_seconds)))
    me = psutil.Process()
    options = SimulationOptions(
        devices=count,
        scenario="happy",
        home=home,
        ports=ports,
        ramp=rate,
        telemetry_interval=60.0,
        workdir=work,
        seed=2,
        bring_up_timeout=count / rate + 90,
    )
    async with Simulation(options, get_scenario("happy")) as sim:
        assert sim.fleet is not None
        sim.fleet.listeners.append(retries)
        r0, f0 = retries.enroll_retries, 0
        cpu0, scpu0, w0 = me.cpu_times(), server.cpu_times(), time.monotonic()
        await sim.bring_up()
        wall = time.monotonic() - w0
        cpu1, scpu1 = me.cpu_times(), server.cpu_times()
        traces = list(sim.journal.traces.values())
        starts = [t.started for t in traces if t.started is not None]
        enrolled = [t.enrolled for t in traces if t.enrolled is not None]
        window = (max(enrolled) - min(starts)) if enrolled and starts else float("nan")
        lat = percentiles(v for t in traces if (v := t.enroll_latency) is not None)
        failed = sum(1 for t in traces if t.enrolled is None) + f0
        step_retries = retries.enroll_retries - r0
        await sim.finish([])
    achieved = len(enrolled) / window if window and window > 0 else 0.0
    return {
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "offered_per_s": rate,
        "devices": count,
        "enrolled": len(enrolled),
        "achieved_per_s": round(achieved, 1),
        "enroll_latency": lat.as_json(),
        "retries": step_retries,
        "failed": failed,
        "sim_cpu_pct": round(100 * (_cpu(cpu1) - _cpu(cpu0)) / wall, 1),
        "server_cpu_pct": round(100 * (_cpu(scpu1) - _cpu(scpu0)) / wall, 1),
    }


async def enrollment_knee(
    home: Path,
    ports: Ports,
    server: psutil.Process,
    args: argparse.Namespace,
    work: Path,
    retries: RetryCounter,
    deadline: float,
) -> dict[str, Any]:
    steps = []
    knee = None
    for rate in args.rates:
        if time.monotonic() > deadline:
            print("  time limit reached; stopping the ramp", flush=True)
            break
        print(f"phase 2: offering {rate:g} enrollments/s ...", flush=True)
        step = await rate_step(home, ports, server, rate, args, work, retries)
        print(f"  {step}", flush=True)
        steps.append(step)
        clean = (
            step["retries"] == 0 and step["failed"] == 0 and step["achieved_per_s"] >= 0.9 * rate
        )
        if not clean:
            break
        knee = step
    return {"steps": steps, "knee": knee}


def table(result: dict[str, Any]) -> str:
    c = result["concurrency"]
    lines = [
        "",
        f"fleetpki simulate bench on {result['machine']['cpu']} x{result['machine']['cores']}",
        "",
        "phase 1: concurrently connected agents in one process",
        f"  devices                      {c['devices']:,} (at most {c['max_inflight']} "
        "bringing up at once)",
        f"  all connected                {c['all_connected']} in {c['bring_up_s']} s",
        f"  connected while held         >= {c['min_connected_while_held']:,} for {c['held_s']} s",
        f"  broker ESTABLISHED (peak)    {c['peak_broker_sessions']:,}",
        f"  simulator RSS                {c['sim_rss_mib']:,} MiB "
        f"({c['sim_rss_per_agent_kib']} KiB/agent)",
        f"  simulator open files         {c['sim_fds']:,} ({c['sim_fds_per_agent']}/agent)",
        f"  CPU while idle-connected     sim {c['sim_cpu_idle_pct']}%, "
        f"server {c['server_cpu_idle_pct']}%",
        "",
        "phase 2: end-to-end enrollment rate (offered -> achieved)",
        "  offered/s  devices  achieved/s   p50 ms   p95 ms   p99 ms  retries  failed  "
        "sim CPU  server CPU",
    ]
    for s in result["enrollment"]["steps"]:
        lat = s["enroll_latency"]
        lines.append(
            f"  {s['offered_per_s']:>9g}  {s['devices']:>7}  {s['achieved_per_s']:>10}  "
            f"{lat['p50_ms']!s:>7}  {lat['p95_ms']!s:>7}  {lat['p99_ms']!s:>7}  "
            f"{s['retries']:>7}  {s['failed']:>6}  {s['sim_cpu_pct']:>6}%  "
            f"{s['server_cpu_pct']:>9}%"
        )
    knee = result["enrollment"]["knee"]
    lines.append(
        f"  knee: {knee['achieved_per_s']}/s at offered {knee['offered_per_s']:g}/s"
        if knee
        else "  knee: none of the offered rates was clean"
    )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    errors = LoopErrors()
    loop.set_exception_handler(errors)
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)  # cleanup below still runs
    begun = time.monotonic()
    deadline = begun + args.time_limit
    base = Path(tempfile.mkdtemp(prefix="fleetpki-bench-sim-"))
    shm = Path("/dev/shm")
    work = Path(
        tempfile.mkdtemp(prefix="fleetpki-bench-agents-", dir=shm if shm.is_dir() else base)
    )
    ports = Ports(est=free_port(), http=free_port(), mqtt=free_port())
    home = base / "home"
    retries = RetryCounter()
    # The agents report retries as events (counted above); thousands of agents' log lines
    # would only flood the terminal and cost CPU.
    agent_log = logging.getLogger("fleetpki.agent")
    agent_log.addHandler(logging.NullHandler())
    agent_log.setLevel(logging.ERROR)
    agent_log.propagate = False
    init_home(home, ports)
    proc = start_serve(home, ports, base / "serve.log")
    try:
        server = psutil.Process(proc.pid)
        result: dict[str, Any] = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "loop": type(asyncio.get_running_loop()).__module__,
                "fd_limit": _fd_limit(),
            },
        }
        result["enrollment"] = (
            {"steps": [], "knee": None}
            if args.skip_knee
            else await enrollment_knee(home, ports, server, args, work, retries, deadline)
        )
        retries.reasons.clear()
        result["concurrency"] = await concurrency(home, ports, server, args, work, retries)
        result["agent_mqtt_retries_total"] = retries.mqtt_retries
        result["agent_retry_reasons"] = dict(retries.reasons.most_common(12))
        result["loop_callback_errors"] = dict(errors.counts)
        result["elapsed_s"] = round(time.monotonic() - begun, 1)
        return result
    finally:
        stop_serve(proc)
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def _fd_limit() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        # Each agent holds its TLS socket plus paho's wake-up socket pair: three descriptors.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--devices", type=int, default=5000)
    ap.add_argument("--ramp", type=float, default=None, help="phase 1 agents/s (default: no cap)")
    ap.add_argument(
        "--max-inflight",
        type=int,
        default=16,
        help="phase 1: at most this many agents enrolling/connecting at once",
    )
    ap.add_argument("--skip-knee", action="store_true", help="phase 1 only")
    ap.add_argument("--hold", type=float, default=30.0, help="seconds to hold them connected")
    ap.add_argument("--telemetry-interval", type=float, default=30.0)
    ap.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[20.0, 40.0, 80.0, 160.0, 320.0],
    )
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--max-step-devices", type=int, default=1500)
    ap.add_argument("--time-limit", type=float, default=900.0, help="stop ramping after this")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the home and serve.log")
    ap.add_argument("--json", default=str(ROOT / "bench/results/simulate.json"))
    args = ap.parse_args()
    if not args.no_uvloop:
        install_fast_loop()
    result = asyncio.run(run(args))
    print(table(result))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
