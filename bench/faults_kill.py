"""Campaign: kill -9 of `fleetpki serve` during an enrollment and renewal storm (issue 18).

    nice -n 19 .venv/bin/python bench/faults_kill.py [--kills 50] [--seed 1]
        [--registry sqlite|postgresql] [--json bench/results/faults_kill.json]

The storm and the checks are tests/storm.py's (the suite's tests/integration/test_kill_serve.py
runs them with 5 kills): token enrollers, mTLS renewers and real agents against `fleetpki serve`
processes on fixed loopback ports. After a random 0.3-2 s of storm, one node is killed with
SIGKILL and started again at once; after each restart every certificate any client received is
checked against the registry (present, same fingerprint; one certificate per token; no serial
twice; SQLite's integrity_check) and the time from the kill to the new process's first 200 and
to every agent being connected again is recorded. At the end, each client's newest certificate
must be its identity's one active certificate. `--registry postgresql`: two nodes (`fleetpki
node add`) on a throwaway PostgreSQL cluster, a random one killed each time.

Prints a table and writes JSON; exits 1 if any violation was found.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.storm import Kill, Ledger, StormConfig, make_nodes, run_campaign  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--registry", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--enrollers", type=int, default=6)
    parser.add_argument("--renewers", type=int, default=4)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--validity", type=float, default=60.0, help="device certificates, s")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/faults_kill.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the agents' reconnect warnings are expected

    cluster = None
    registry: str | None = None
    password: str | None = None
    work = Path(tempfile.mkdtemp(prefix="faults-kill-"))
    if args.registry == "postgresql":
        from tests.pg_cluster import PASSWORD, PgCluster

        cluster = PgCluster.start()
        registry, password = cluster.new_database().replace(f":{PASSWORD}@", "@"), PASSWORD
    count = 2 if cluster else 1
    nodes = make_nodes(
        work,
        count,
        registry=registry,
        registry_password=password,
        device_validity=timedelta(seconds=args.validity),
    )
    config = StormConfig(
        enrollers=args.enrollers,
        renewers=args.renewers,
        agents=args.agents,
        tokens=200 * args.kills + 400,
    )
    started, wall = time.monotonic(), datetime.now(UTC)

    def progress(n: int, kill: Kill, ledger: Ledger) -> None:
        print(
            f"kill {n:3d} of {kill.node}: after {kill.after:4.2f} s, {kill.in_flight:2d} in "
            f"flight, serving again in {kill.to_serving:5.2f} s, agents back in "
            f"{kill.agents_back or 0:5.2f} s; {ledger.certificates()} certificates so far",
            flush=True,
        )

    try:
        campaign, storm = run_campaign(
            nodes,
            work,
            config,
            kills=args.kills,
            seed=args.seed,
            gap=(0.3, 2.0),
            wait_agents_each=True,
            progress=progress,
        )
    finally:
        for node in nodes:
            node.stop()
        if cluster is not None:
            cluster.stop()
    summary = campaign.summary(storm.ledger, storm)
    backs = sorted(k.agents_back for k in campaign.kills if k.agents_back is not None)
    summary["agents_back_p50_s"] = round(statistics.median(backs), 2) if backs else None
    summary["agents_back_max_s"] = round(backs[-1], 2) if backs else None
    result: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "started": wall.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "registry": args.registry,
        "nodes": len(nodes),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "summary": summary,
        "violations": campaign.violations,
        "kills": [vars(k) for k in campaign.kills],
    }
    width = max(len(k) for k in summary)
    print()
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    for violation in campaign.violations[:50]:
        print("VIOLATION", violation)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json} ({work} kept: serve logs)")
    return 1 if campaign.violations else 0


if __name__ == "__main__":
    sys.exit(main())
