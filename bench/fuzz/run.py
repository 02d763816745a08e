"""Run the atheris harnesses of bench/fuzz/ with a time budget and report what they did.

    .venv/bin/python bench/fuzz/run.py [--seconds 600] [--jobs 2] [NAME ...]

Each harness (fuzz_NAME.py; all of them by default) runs under `nice -n 19` for --seconds,
--jobs at a time, its corpus kept in FLEETPKI_FUZZ_DIR/NAME (default /tmp/fleetpki-fuzz) so
that a second run starts where the first stopped. A crash (an exception the code under test
must not raise, or a broken property) stops that harness and leaves the input in
FLEETPKI_FUZZ_DIR/crashes/; rerun it with `python bench/fuzz/fuzz_NAME.py FILE`, then make
it a regression test. Prints a table (executions, exec/s, coverage edges and features at the
end, corpus size, crashes) and writes bench/results/fuzz.json. Exit status 1 if any crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_STATUS = re.compile(rb"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_STAT = re.compile(rb"stat::(\w+):\s+(\d+)")


def harnesses() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))


def run_one(name: str, seconds: int, base: Path) -> dict[str, object]:
    crashes = base / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    log_path = base / f"{name}.log"
    command = [
        sys.executable,
        str(HERE / f"fuzz_{name}.py"),
        f"-max_total_time={seconds}",
        "-print_final_stats=1",
        f"-artifact_prefix={crashes}/{name}-",
        str(base / name),
    ]
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=lambda: os.nice(19),
            check=False,
        )
    output = log_path.read_bytes()
    statuses = _STATUS.findall(output)
    stats = {k.decode(): int(v) for k, v in _STAT.findall(output)}
    last = statuses[-1] if statuses else (b"0", b"0", b"0", b"0")
    executions = stats.get("number_of_executed_units", int(last[0]))
    elapsed = time.monotonic() - started
    return {
        "harness": name,
        "seconds": round(elapsed),
        "executions": executions,
        "exec_per_s": round(executions / elapsed) if elapsed else 0,
        "cov": int(last[1]),
        "ft": int(last[2]),
        "corpus": int(last[3]),
        "crashed": proc.returncode != 0,
        "log": str(log_path),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"harnesses (default all: {harnesses()})")
    parser.add_argument("--seconds", type=int, default=600, help="per harness (default 600)")
    parser.add_argument("--jobs", type=int, default=1, help="harnesses at a time (default 1)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/fuzz.json")
    args = parser.parse_args()
    names = args.names or harnesses()
    unknown = sorted(set(names) - set(harnesses()))
    if unknown:
        parser.error(f"no such harness: {', '.join(unknown)}")
    base = Path(os.environ.get("FLEETPKI_FUZZ_DIR", "/tmp/fleetpki-fuzz"))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda n: run_one(n, args.seconds, base), names))
    print(
        f"{'harness':<16} {'s':>5} {'executions':>11} {'exec/s':>7} {'cov':>5} {'ft':>6} "
        f"{'corpus':>6}  result"
    )
    for r in results:
        verdict = f"CRASH (see {r['log']})" if r["crashed"] else "ok"
        print(
            f"{r['harness']:<16} {r['seconds']:>5} {r['executions']:>11} {r['exec_per_s']:>7} "
            f"{r['cov']:>5} {r['ft']:>6} {r['corpus']:>6}  {verdict}"
        )
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    when = datetime.now(UTC).isoformat(timespec="seconds")
    previous.update({str(r["harness"]): {**r, "finished": when} for r in results})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(previous, indent=2) + "\n")
    return 1 if any(r["crashed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
