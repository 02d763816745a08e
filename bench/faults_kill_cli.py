"""kill -9 of operator commands (issue 18, campaign 2), the long form.

    nice -n 19 .venv/bin/python bench/faults_kill_cli.py [--kills 50] [--seed 18] [--json F]

`batch create`, `device revoke`, `batch revoke` and `server-cert renew` each run --kills times
as real subprocesses against one home served by a real `fleetpki serve`, each killed with
SIGKILL after a random delay spread over its measured run time, then checked (all or nothing,
or batch revoke's resumable state) and run again (which must complete the job): see
tests/kill_cli.py for what is checked. Prints a table and the JSON; exit status 1 on any
violation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.kill_cli import COMMANDS, campaign  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="kills per command")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--batch-size", type=int, default=200, help="devices per batch create")
    parser.add_argument("--revoke-size", type=int, default=1200, help="devices per batch revoke")
    parser.add_argument("--command", action="append", choices=COMMANDS, help="only these")
    parser.add_argument("--json", type=Path, help="write the tallies here")
    args = parser.parse_args()
    started = time.monotonic()
    tallies = campaign(
        args.kills, seed=args.seed, batch_size=args.batch_size, revoke_size=args.revoke_size,
        commands=tuple(args.command or COMMANDS),
    )  # fmt: skip
    print(f"{'command':<18} {'run s':>6} {'kills':>6} {'running':>8} {'reruns ok':>10} "
          f"{'violations':>10}  states after the kill")  # fmt: skip
    for t in tallies:
        states = ", ".join(f"{k} {v}" for k, v in sorted(t.states.items()))
        print(f"{t.command:<18} {t.duration_s:>6.2f} {t.kills:>6} {t.killed_running:>8} "
              f"{t.reruns:>10} {len(t.violations):>10}  {states}")  # fmt: skip
    print(f"{time.monotonic() - started:.0f} s")
    data = [t.to_json() for t in tallies]
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    for t in tallies:
        for v in t.violations:
            print(f"VIOLATION {t.command}: {v}")
    return 1 if any(t.violations for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
