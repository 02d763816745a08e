"""Benchmark: factory batch creation (registry rows and bundles) and its peak memory vs N.

    .venv/bin/python bench/batch.py [--n 100000] [--sizes 10000,100000] [--tar]
                                    [--dir /path/on/the/target/disk]
                                    [--json bench/results/batch.json]

Every measurement runs in a fresh child process (so ru_maxrss is that run's own peak) on a
fresh home (`fleetpki init` in-process) and a fresh registry:

* registry: `Registry.create_batch` fed by a generator that mints a 256-bit token and hashes
  it per device - the registry rows alone, one all-or-nothing transaction;
* api: `provision_batch(out_dir=None)` - the admin API path, tokens handed back in memory;
* full: `create_batch` with bundles (DIR/<id>/{agent.toml, ca.pem, token} + manifest.csv),
  as `fleetpki batch create` runs it, with the time of each phase (bundles, the one
  file-system sync, registry transaction, publish by rename);
* fs floor: in the same child just before and just after `full`, the raw rate of this disk
  for the same syscalls (mkdir + 3 x open/write/close of ~600 bytes, no Python logic) on
  3,000 devices: bundle writing cannot beat it, and it shows how busy the disk was.

The output folder is deleted after each run (outside the timed window).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from enroll_server.home.config import load_config  # noqa: E402
from enroll_server.registry import NewDevice, Registry  # noqa: E402
from fleetpki.identity import DeviceId  # noqa: E402
from provisioning.batch import BatchRequest, create_batch, provision_batch  # noqa: E402
from provisioning.tokens import hash_token, new_token  # noqa: E402
from tests.live_server import make_home  # noqa: E402

FLOOR_DEVICES = 3000


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fs_floor(folder: Path, n: int) -> float:
    """Devices/s for the bare syscalls of a bundle on this disk right now."""
    folder.mkdir()
    data = b"x" * 600
    started = time.perf_counter()
    for i in range(n):
        d = os.path.join(folder, f"d{i:06d}")
        os.mkdir(d, 0o700)
        for name in ("agent.toml", "ca.pem", "token"):
            fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
    # Kept until the work folder is deleted: deleting 4 * n entries right before the timed run
    # would load the disk with that deletion's journal and discard work.
    return n / (time.perf_counter() - started)


def child(mode: str, n: int, work: Path, tar: bool) -> dict[str, Any]:
    layout = make_home(work / "home")
    config = load_config(layout.config)
    now = datetime.now(UTC)
    base_rss = peak_rss_mib()
    out: dict[str, Any] = {"mode": mode, "n": n, "rss_before_mib": round(base_rss, 1)}
    with Registry.open(layout.registry) as registry:
        if mode == "registry":

            def devices() -> Any:
                for i in range(n):
                    yield NewDevice(DeviceId(f"r-{i:07d}"), hash_token(new_token()))

            started = time.perf_counter()
            count = registry.create_batch(
                "bench", devices(), kind="token", token_ttl=timedelta(days=7), now=now, actor="b"
            )
            elapsed = time.perf_counter() - started
        elif mode == "api":
            started = time.perf_counter()
            result = provision_batch(
                registry,
                layout,
                config,
                count=n,
                prefix="a-",
                token_ttl=None,
                now=now,
                actor="bench",
            )
            elapsed = time.perf_counter() - started
            count = result.count
        else:
            floor_before = fs_floor(work / "floor-before", FLOOR_DEVICES)
            marks: dict[str, float] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if done >= total:  # the last "done" report of a phase ends it
                    marks[phase] = time.perf_counter()

            started = time.perf_counter()
            result = create_batch(
                registry,
                layout,
                config,
                BatchRequest(count=n, out_dir=work / "lot", tar=tar),
                now=now,
                actor="bench",
                progress=progress,
            )
            elapsed = time.perf_counter() - started
            count = result.count
            prev = started
            phases = {}
            for phase in ("bundles", "sync", "registry", "publish"):
                if phase in marks:
                    phases[phase] = round(marks[phase] - prev, 2)
                    prev = marks[phase]
            out["phases_s"] = phases
            out["bundle_files"] = sum(1 for _ in os.scandir(work / "lot"))
            floor_after = fs_floor(work / "floor-after", FLOOR_DEVICES)
            out["fs_floor_devices_per_s"] = [round(floor_before), round(floor_after)]
    out.update(
        count=count,
        seconds=round(elapsed, 2),
        per_s=round(count / elapsed),
        peak_rss_mib=round(peak_rss_mib(), 1),
    )
    return out


def run_child(mode: str, n: int, root: Path, tar: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"batch-{mode}-", dir=root))
    try:
        cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--dir", str(work)]
        if tar:
            cmd.append("--tar")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"child {mode} {n} failed:\n{proc.stderr}")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        # Not timed: 100,000 folders take a while to delete on a busy disk.
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--sizes", default="10000,100000", help="N values for the RSS comparison")
    ap.add_argument("--tar", action="store_true", help="one tar per device")
    ap.add_argument("--dir", default=None, help="work folder (default: the temp folder)")
    ap.add_argument("--json", default=str(ROOT / "bench/results/batch.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        result = child(args.child, args.n, Path(args.dir), args.tar)
        print(json.dumps(result))
        return

    root = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s} | {args.n})
    runs: list[dict[str, Any]] = []
    for mode in ("registry", "api"):
        runs.append(run_child(mode, min(args.n, 100_000), root, args.tar))
        print(json.dumps(runs[-1]), flush=True)
    for n in sizes:
        runs.append(run_child("full", n, root, args.tar))
        print(json.dumps(runs[-1]), flush=True)

    py = platform.python_version()
    print(f"\nbatch create on {cpu_model()}, {os.cpu_count()} CPUs, Python {py}")
    header = f"{'run':<10}{'N':>8}{'seconds':>9}{'per s':>9}{'peak RSS MiB':>14}  details"
    print(header)
    print("-" * len(header))
    for r in runs:
        details = ""
        if r["mode"] == "full":
            floor = "/".join(str(f) for f in r["fs_floor_devices_per_s"])
            details = f"phases {r['phases_s']}  fs floor before/after {floor}/s"
        print(
            f"{r['mode']:<10}{r['n']:>8}{r['seconds']:>9}{r['per_s']:>9}"
            f"{r['peak_rss_mib']:>14}  {details}"
        )
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "work_dir": str(root),
        },
        "tar": args.tar,
        "runs": runs,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
