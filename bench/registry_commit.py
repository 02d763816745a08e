"""Benchmark: how long the server's registry commits hold its event loop, at fleet size.

    .venv/bin/python bench/registry_commit.py [--fleet 100000] [--n 6000]
                                              [--json bench/results/registry_commit.json]

A registry holding `--fleet` enrolled devices; `--n` new devices then enroll in random order,
in group commits of 15 (`Registry.record_issuances(wait=False)`, as the server's commit
queue makes them), one commit every 10 ms (~1500 enrollments/s). Each commit is timed as the
enrollment feels it (from the first attempt until recorded, busy retries 2 ms apart included,
as commit_queue retries) and as the event loop does (each call alone: what it holds every
other connection for). Two ways, on fresh copies of the same registry:

* loop checkpoints: the connection checkpoints by itself past 10,000 WAL pages (what the
  server did before registry.checkpointer): the commit that crosses it copies the WAL back;
* checkpointer thread: the connection's threshold is the 40,000-page backstop and a
  Checkpointer thread checkpoints past the same 10,000 pages; commits only wait (off the
  loop) while its RESTART step holds the write lock, and the loop serves others meanwhile.

Prints the commit time's median, p99 and max, how long the loop was held at most, the largest
WAL seen and the checkpoint runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from enroll import enrolled_fleet  # noqa: E402 (bench/enroll.py)

from enroll_server.home.layout import hash_secret, load_home, new_secret  # noqa: E402
from enroll_server.registry import (  # noqa: E402
    Issuance,
    IssuedCertificate,
    NewDevice,
    Registry,
    RegistryBusy,
)
from enroll_server.registry.checkpointer import (  # noqa: E402
    LOOP_AUTOCHECKPOINT_PAGES,
    Checkpointer,
)
from fleetpki.identity import DeviceId  # noqa: E402
from tests.live_server import make_home  # noqa: E402

BATCH = 15
PACE = 0.010


def run(db: Path, n: int, *, thread: bool, now: datetime) -> dict[str, float]:
    registry = Registry.open(db, wal_autocheckpoint=LOOP_AUTOCHECKPOINT_PAGES if thread else 10_000)
    checkpointer = Checkpointer(db) if thread else None  # as the server runs it
    ids = [DeviceId(f"new-{i:06d}") for i in range(n)]
    hashes = [hash_secret(new_secret()) for _ in ids]
    registry.create_batch(
        "new",
        (NewDevice(d, h, now + timedelta(days=1)) for d, h in zip(ids, hashes, strict=True)),
        kind="token",
        token_ttl=timedelta(days=1),
        now=now,
        actor="bench",
    )
    pem = registry.certificates_of(DeviceId("fleet-0000000"))[0].pem
    order = list(range(n))
    random.Random(n).shuffle(order)
    wal = Path(f"{db}-wal")
    times: list[float] = []  # first attempt to recorded, retries included
    held: list[float] = []  # each call: what the event loop would be held for
    retries = 0
    biggest_wal = 0
    if checkpointer is not None:
        checkpointer.start()
    try:
        for k in range(0, n, BATCH):
            batch = [
                Issuance(
                    IssuedCertificate(
                        serial=int.from_bytes(os.urandom(19), "big") | 1 << 150,
                        device_id=ids[i],
                        fingerprint_sha256=os.urandom(32).hex(),
                        not_before=now,
                        not_after=now + timedelta(days=30),
                        pem=pem,
                    ),
                    hashes[i],
                    None,
                    now,
                    "device",
                )
                for i in order[k : k + BATCH]
            ]
            started = time.perf_counter()
            while True:
                call = time.perf_counter()
                try:
                    outcomes = registry.record_issuances(batch, wait=False)
                    held.append(time.perf_counter() - call)
                    break
                except RegistryBusy:
                    held.append(time.perf_counter() - call)
                    retries += 1
                    time.sleep(0.002)  # the loop would serve others meanwhile
            times.append(time.perf_counter() - started)
            if any(o is not None for o in outcomes):
                raise SystemExit(f"refused: {outcomes}")
            biggest_wal = max(biggest_wal, wal.stat().st_size)
            time.sleep(PACE)
    finally:
        if checkpointer is not None:
            checkpointer.stop()
        registry.close()
    times.sort()
    return {
        "commits": len(times),
        "median_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(times[int(len(times) * 0.99)] * 1000, 1),
        "max_ms": round(times[-1] * 1000, 1),
        "over_10ms": sum(1 for t in times if t > 0.010),
        "loop_held_max_ms": round(max(held) * 1000, 1),
        "loop_held_over_10ms": sum(1 for t in held if t > 0.010),
        "busy_retries": retries,
        "biggest_wal_mb": round(biggest_wal / 1e6, 1),
        "checkpoint_runs": checkpointer.runs if checkpointer is not None else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fleet", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--json", default=str(ROOT / "bench/results/registry_commit.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleetpki-commit-"))
    try:
        home = tmp / "home"
        make_home(home)
        loaded = load_home(home)
        now = datetime.now(UTC)
        print(f"registering a fleet of {args.fleet} enrolled devices (untimed)...", flush=True)
        enrolled_fleet(loaded, args.fleet, now)
        with Registry.open(loaded.layout.registry):
            pass  # the last connection to close checkpoints and removes the WAL
        results = {}
        for name, thread in (("loop checkpoints", False), ("checkpointer thread", True)):
            copy = tmp / name.replace(" ", "-")
            copy.mkdir()
            shutil.copy(loaded.layout.registry, copy / "registry.db")
            results[name] = run(copy / "registry.db", args.n, thread=thread, now=now)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = list(next(iter(results.values())))
    print(f"\n{'commit of 15, random order':28}" + "".join(f"{n:>22}" for n in results))
    for key in keys:
        print(f"{key:28}" + "".join(f"{r[key]:>22}" for r in results.values()))
    out = {
        "benchmark": "registry_commit",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}",
        "fleet": args.fleet,
        "n": args.n,
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
