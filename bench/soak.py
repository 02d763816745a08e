"""Soak: renewals, revocations and broker restarts for a long time; memory, fds, QoS 1, stuck.

    nice -n 19 .venv/bin/python bench/soak.py [--devices 2000] [--minutes 30] [--validity 60]
        [--broker-every 300] [--revoke-share 0.01] [--sample-every 10] [--shards 1]
        [--png docs/soak.png]

`fleetpki serve --no-broker` and `fleetpki broker` run as two processes on a temporary home
whose device certificates last --validity seconds; the simulated fleet (this process) renews
at 2/3 of each lifetime, --revoke-share of it is revoked every minute, the broker is
restarted every --broker-every seconds (simulators/soak.py has the details); --shards runs
the agents in that many processes (the simulator's RSS and fds are their sum). Prints a table:
RSS and open fds of server, broker and simulator (after the warm-up: first, last, slope per
hour), QoS 1 telemetry acknowledged vs received, stuck agents; writes JSON (--json) and a PNG
of RSS, fds and connected devices over time (--png). Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulators.soak import SoakOptions, SoakResult, run_soak  # noqa: E402

PROCESSES = ("server", "broker", "simulator")
MIB = 1024 * 1024
STUCK_SHOWN = 5  # stuck agents whose detail the table shows (all of them are in the JSON)


def table(result: SoakResult) -> str:
    o = result.options
    lines = [
        f"fleet {result.devices} agents, {result.seconds / 60:.1f} min after bring-up, "
        f"certificates of {o.validity:.0f} s, {len(result.restarts)} broker restarts, "
        f"{len(result.revocations)} revocations, {result.renewals:,} renewals "
        f"(fewest for an agent never revoked: {result.min_renewals})",
        "",
        f"{'process':<10} {'RSS MiB (warm -> end)':>22} {'MiB/h':>7} {'fds (warm -> end)':>18} "
        f"{'fds/h':>7}",
    ]
    for name in PROCESSES:
        rss = result.after_warmup("rss", name)
        fds = result.after_warmup("fds", name)
        rss_slope = result.slope_per_hour("rss", name)
        fds_slope = result.slope_per_hour("fds", name)
        lines.append(
            f"{name:<10} {rss[0] / MIB:>10.1f} -> {rss[1] / MIB:>7.1f} "
            f"{_num(rss_slope, MIB):>7} {fds[0]:>8} -> {fds[1]:>5} {_num(fds_slope, 1):>7}"
        )
    lines += [
        "",
        f"QoS 1 telemetry (broker lifetimes, observer subscribed): {result.acknowledged:,} "
        f"acknowledged, {result.received:,} received, {result.lost} lost",
        f"  during broker restarts (observer away, clean session): "
        f"{result.window_acknowledged:,} acknowledged, {result.window_received:,} received",
        f"agents stuck: {len(result.stuck)}; revoked agents still connected: "
        f"{len(result.revoked_connected)}",
    ]
    for device_id in result.stuck[:STUCK_SHOWN]:
        lines.append(f"  stuck {device_id}: {result.stuck_detail.get(device_id)}")
    if result.loop_lag:
        worst = sorted(result.loop_lag, key=lambda tl: -tl[1])[:5]
        lags = sorted(lag for _, lag in result.loop_lag)
        lines.append(
            f"simulator loop lag per {result.options.sample_every:g}-s sample: median "
            f"{lags[len(lags) // 2]:.2f} s; worst "
            + ", ".join(f"{lag:.1f} s at {t:.0f} s" for t, lag in worst)
        )
    return "\n".join(lines)


def _num(value: float | None, unit: float) -> str:
    return "-" if value is None else f"{value / unit:+.1f}"


def plot(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for name in PROCESSES:
        rss = result.series("rss", name)
        fds = result.series("fds", name)
        axes[0].plot([t / 60 for t, _ in rss], [v / MIB for _, v in rss], label=name)
        axes[1].plot([t / 60 for t, _ in fds], [v for _, v in fds], label=name)
    axes[2].plot([s.t / 60 for s in result.samples], [s.connected for s in result.samples])
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].set_ylabel("open fds")
    axes[2].set_ylabel("connected devices")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for t in result.restarts:
            ax.axvline(t / 60, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_title(
        f"soak: {result.devices} agents, certificates of {result.options.validity:.0f} s, "
        "broker restarts dotted"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--validity", type=float, default=60.0, help="seconds")
    parser.add_argument("--broker-every", type=float, default=300.0, help="seconds")
    parser.add_argument("--revoke-share", type=float, default=0.01, help="of the fleet a minute")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds")
    parser.add_argument("--max-inflight", type=int, default=32)
    parser.add_argument(
        "--shards", type=int, default=1, help="processes the simulated agents run in"
    )
    parser.add_argument("--png", type=Path, default=ROOT / "bench/results/soak.png")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/soak.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(message)s")
    options = SoakOptions(
        devices=args.devices,
        duration=args.minutes * 60,
        validity=args.validity,
        revoke_share=args.revoke_share,
        revoke_every=60.0,
        broker_every=args.broker_every,
        sample_every=args.sample_every,
        telemetry_interval=args.telemetry_interval,
        max_inflight=args.max_inflight,
        shards=args.shards,
    )
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = asyncio.run(run_soak(options))
    print(f"soak started {started}")
    print(table(result))
    plot(result, args.png)
    data = asdict(result)
    data.pop("report", None)
    data["options"] = {k: str(v) for k, v in data["options"].items()}
    data.update(
        started=started,
        acknowledged=result.acknowledged,
        received=result.received,
        lost=result.lost,
        slopes_per_hour={
            f"{kind}_{name}": result.slope_per_hour(kind, name)
            for kind in ("rss", "fds")
            for name in PROCESSES
        },
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    report = result.report
    failed = [c for c in report.checks if not c.passed] if report else []
    for check in failed:
        print(f"FAILED: {check.name}: {check.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
