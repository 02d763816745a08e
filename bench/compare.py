"""Compare two trees with bench/enroll.py, run after run, alternately: medians [min - max].

    .venv/bin/python bench/compare.py OTHER_TREE [--k 7] [-- bench/enroll.py arguments...]

On a shared machine one run of the same tree can differ from the next by 15 % (other guests
on the host, not our code); a change worth a few percent only shows in the medians of runs
that alternate, so that both trees see the same spells of noise. OTHER_TREE is typically a
worktree of the commit to compare with (`git worktree add /tmp/base <commit>`); each tree runs
its own bench/enroll.py, so copy this tree's bench/ there first if it changed, or the two
floors differ. Both trees need a .venv (a symlink to this one will do).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = (
    ("ratio_vs_floor", "server / floor", "{:.2f}"),
    ("server_cpu_ms_per_enrollment", "server CPU ms", "{:.3f}"),
    ("raw_floor_cpu_ms", "floor ms", "{:.3f}"),
    ("ratio_vs_own_floor", "server / own floor", "{:.2f}"),
    ("own_floor_cpu_ms", "own floor ms", "{:.3f}"),
    ("enrollments_per_s", "enrollments/s", "{:.0f}"),
    ("p99_ms", "p99 ms", "{:.0f}"),
    ("errors", "errors", "{:.0f}"),
)


def run(tree: Path, args: list[str], out: Path) -> dict[str, float]:
    subprocess.run(
        [str(tree / ".venv/bin/python"), str(tree / "bench/enroll.py"), *args, "--json", str(out)],
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    data: dict[str, float] = json.loads(out.read_text())
    return data


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("other", type=Path, help="the tree to compare this one with")
    ap.add_argument("--k", type=int, default=7, help="runs of each tree (default 7)")
    ap.add_argument("--json", default=str(ROOT / "bench/results/compare.json"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    extra = argv[cut + 1 :]  # after "--": bench/enroll.py's arguments
    trees = {"other": args.other.resolve(), "this": ROOT}
    for name, tree in trees.items():
        if not (tree / "bench/enroll.py").is_file() or not (tree / ".venv/bin/python").exists():
            raise SystemExit(f"{name} tree {tree}: needs bench/enroll.py and .venv/bin/python")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="fleetpki-compare-") as tmp:
        for i in range(args.k):
            for name, tree in trees.items():
                result = run(tree, extra, Path(tmp) / f"{name}-{i}.json")
                runs[name].append(result)
                print(
                    f"run {i + 1}/{args.k} {name:5}: ratio {result['ratio_vs_floor']:.2f}, "
                    f"server {result['server_cpu_ms_per_enrollment']:.3f} ms, "
                    f"floor {result['raw_floor_cpu_ms']:.3f} ms",
                    flush=True,
                )
    summary: dict[str, dict[str, list[float]]] = {}
    print(f"\n{'median [min - max]':24}" + "".join(f"{n:>26}" for n in trees))
    for key, label, fmt in METRICS:
        row = f"{label:24}"
        for name in trees:
            values = [float(r[key]) for r in runs[name] if r.get(key) is not None]
            if not values:
                row += f"{'-':>26}"
                continue
            med = statistics.median(values)
            summary.setdefault(name, {})[key] = [med, min(values), max(values)]
            cell = f"{fmt.format(med)} [{fmt.format(min(values))} - {fmt.format(max(values))}]"
            row += f"{cell:>26}"
        print(row)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "benchmark": "enroll-compare",
                "trees": {n: str(t) for n, t in trees.items()},
                "enroll_args": extra,
                "k": args.k,
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
