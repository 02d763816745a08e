"""Benchmark: the device agent's footprint next to a baseline measured in the same run.

    .venv/bin/python bench/agent_footprint.py [--runs 5] [--idle 10]
        [--json bench/results/agent_footprint.json]

Measured on a real service + embedded broker on 127.0.0.1 (run in this process):
- RSS of an enrolled, connected, idle `fleetpki-agent run` process, next to the baseline
  `python -c "import cryptography.x509, paho.mqtt.client"` (the least a Python mTLS MQTT
  client can load). Target: <= 1.2 x baseline.
- start-to-connected with an existing certificate: from spawning the process to the agent's
  status file saying `connected` (written right after the broker's CONNACK). The baseline is
  the wall time of the baseline command. Target: <= 1 s.
- idle CPU: the agent's CPU time over an idle window (telemetry every 30 s). Target: ~0.
- for honesty, RSS again after the agent's first renewal (a second service issuing 9-second
  certificates): the EST client, PKCS#7 and CSR code are imported on first use, so an agent
  that has renewed carries them from then on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.live_server import start_live_server  # noqa: E402

BASELINE = "import cryptography.x509, paho.mqtt.client"
MIB = 1024 * 1024


def baseline_rss_and_time(runs: int) -> tuple[float, float]:
    """RSS (MiB) after the baseline imports, and the median wall time of the command."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BASELINE], check=True)
        times.append(time.perf_counter() - t0)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            BASELINE + "; import sys; print('ok', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    rss = psutil.Process(proc.pid).memory_info().rss / MIB
    proc.kill()
    proc.wait()
    return rss, statistics.median(times)


def write_bundle(folder: Path, device: str, server, token: str) -> Path:  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True)
    shutil.copy(server.layout.root_cert, folder / "ca.pem")
    (folder / "token").write_text(token + "\n")
    (folder / "agent.toml").write_text(
        f'[device]\nid = "{device}"\nkey_type = "ec-p256"\n'
        f'[enroll]\nserver = "https://localhost:{server.handle.est_port}"\n'
        'token_file = "token"\ntrust_anchor = "ca.pem"\n'
        f'[mqtt]\nhost = "localhost"\nport = {server.mqtt_port}\ntelemetry_interval = 30.0\n'
        '[state]\ndir = "state"\n'
    )
    return folder / "agent.toml"


def spawn(command: str, config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        agent_cmd(command, config),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM and wait; an agent that does not stop in 20 s is a bug: kill it and say so."""
    proc.terminate()
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        print(f"agent pid {proc.pid} ignored SIGTERM for 20 s (killed)", file=sys.stderr)
        return -9


def agent_cmd(command: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "device_agent.cli", command, "--config", str(config)]


def wait_connected(status: Path, pid: int, timeout: float = 30) -> float:
    """Poll the status file until this process reports `connected`; returns the time."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            data = json.loads(status.read_text())
            if data.get("state") == "connected" and data.get("pid") == pid:
                return time.perf_counter()
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise TimeoutError("agent did not connect")


def rss_after_first_renewal() -> float:
    from datetime import timedelta

    from enroll_server.pki.profile import DeviceProfile

    tmp = Path(tempfile.mkdtemp(prefix="fleetpki-bench-renew-"))
    profile = DeviceProfile(validity=timedelta(seconds=9), backdate=timedelta(seconds=1))
    server = start_live_server(tmp / "home", broker=True, profile=profile)
    try:
        config = write_bundle(tmp / "dev", "bench-dev-2", server, server.mint_device("bench-dev-2"))
        status = config.parent / "state" / "status.json"
        proc = spawn("run", config)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    data = json.loads(status.read_text())
                except (OSError, ValueError):
                    data = {}
                if data.get("renewals", 0) >= 1 and data.get("state") == "connected":
                    break
                time.sleep(0.05)
            else:
                raise TimeoutError("no renewal")
            time.sleep(1)
            return psutil.Process(proc.pid).memory_info().rss / MIB
        finally:
            stop(proc)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="start-to-connected repetitions")
    ap.add_argument("--idle", type=float, default=10.0, help="idle window for RSS/CPU (s)")
    ap.add_argument("--json", default=str(ROOT / "bench/results/agent_footprint.json"))
    args = ap.parse_args()

    load_before = os.getloadavg()
    base_rss, base_time = baseline_rss_and_time(args.runs)
    tmp = Path(tempfile.mkdtemp(prefix="fleetpki-bench-agent-"))
    server = start_live_server(tmp / "home", broker=True)
    try:
        config = write_bundle(tmp / "dev", "bench-dev-1", server, server.mint_device("bench-dev-1"))
        subprocess.run(agent_cmd("enroll", config), check=True, cwd=ROOT, timeout=120)
        status = config.parent / "state" / "status.json"

        starts = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            proc = spawn("run", config)
            try:
                starts.append(wait_connected(status, proc.pid) - t0)
            finally:
                stop(proc)

        proc = spawn("run", config)
        try:
            wait_connected(status, proc.pid)
            ps = psutil.Process(proc.pid)
            time.sleep(2)  # let the first telemetry go out
            cpu0 = sum(ps.cpu_times()[:2])
            time.sleep(args.idle)
            cpu1 = sum(ps.cpu_times()[:2])
            rss = ps.memory_info().rss / MIB
            threads = ps.num_threads()
        finally:
            code = stop(proc)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    renewed_rss = rss_after_first_renewal()
    idle_cpu_pct = 100 * (cpu1 - cpu0) / args.idle
    start_median = statistics.median(starts)
    rows = [
        (
            "RSS, idle connected (MiB)",
            f"{rss:.1f}",
            f"{base_rss:.1f}",
            f"{rss / base_rss:.2f} x",
            "<= 1.2 x",
        ),
        (
            "start-to-connected (s)",
            f"{start_median:.2f}",
            f"{base_time:.2f}",
            f"{start_median / base_time:.2f} x",
            "<= 1 s",
        ),
        ("idle CPU (% of a core)", f"{idle_cpu_pct:.2f}", "-", "-", "~0"),
        (
            "RSS after 1st renewal (MiB)",
            f"{renewed_rss:.1f}",
            f"{base_rss:.1f}",
            f"{renewed_rss / base_rss:.2f} x",
            "(info)",
        ),
    ]
    print(f"\nfleetpki agent footprint ({platform.machine()}, Python {platform.python_version()})")
    print(f"{'metric':<28} {'agent':>8} {'baseline':>9} {'ratio':>8}  target")
    for name, a, b, r, t in rows:
        print(f"{name:<28} {a:>8} {b:>9} {r:>8}  {t}")
    load_after = os.getloadavg()
    print(
        f"start-to-connected runs: {', '.join(f'{s:.2f}' for s in starts)}; threads: {threads}; "
        f"exit on SIGTERM: {code}; load average {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    result = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "baseline_command": f'python -c "{BASELINE}"',
        "baseline_rss_mib": round(base_rss, 2),
        "baseline_time_s": round(base_time, 3),
        "agent_rss_mib": round(rss, 2),
        "rss_ratio": round(rss / base_rss, 3),
        "start_to_connected_s": [round(s, 3) for s in starts],
        "start_to_connected_median_s": round(start_median, 3),
        "idle_window_s": args.idle,
        "idle_cpu_percent": round(idle_cpu_pct, 3),
        "agent_rss_after_first_renewal_mib": round(renewed_rss, 2),
        "threads": threads,
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "targets_met": {
            "rss": rss <= 1.2 * base_rss,
            "start_to_connected": start_median <= 1.0,
            "idle_cpu": idle_cpu_pct < 1.0,
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
