"""Benchmark: fleetpki on PostgreSQL next to SQLite, one node and two; revocation across nodes.

    nice -n 19 .venv/bin/python bench/cluster.py [--n 3000] [--rounds 5] [--revocations 100]
                                                 [--json bench/results/cluster.json]

(a) Enrollments/s and server CPU per enrollment, for three set-ups run alternately
    (--rounds times each, the median kept): `sqlite-1` (one `fleetpki serve --no-broker`, the
    registry a SQLite file in its home), `pg-1` (the same node on a PostgreSQL registry) and
    `pg-2` (two nodes on one PostgreSQL registry, the second made with `fleetpki node add`,
    enroll_server/home/node.py; half the clients on each). The load is bench/enroll.py's: N
    CSRs and tokens made before the timed window, a fresh fully verified TLS 1.3 connection
    per enrollment, 32 concurrent clients in 2 processes. CPU comes from /proc/PID/stat
    (utime + stime) of every serve process and of every process of the throwaway PostgreSQL
    cluster (tests/pg_cluster.py): the postmaster, its live children (client backends,
    checkpointer, WAL writer, autovacuum...) and, through the postmaster's cutime/cstime, the
    children that ended in the window. The figure the target reads is the *server side*:
    serve + PostgreSQL, since SQLite's work happens inside the serve process; serve alone is
    reported next to it. Target: pg-1 <= 1.5 x sqlite-1.
(b) Revocation-to-drop across nodes: two nodes with their embedded brokers on one PostgreSQL
    registry; --revocations devices enroll through node A and hold an mTLS MQTT session on node
    B's broker; each in turn is revoked through node A's admin API and the time from sending
    that request to node B closing the session is recorded (p50/p99). Target: p99 <= 1 s.

Pinning (2 cores here): the server side (serve nodes and PostgreSQL) shares the last core,
the load generators the others (`--no-pin`: the scheduler places everything). Run it under
`nice -n 19` on a shared machine; the PostgreSQL cluster inherits the niceness.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import broker as broker_bench  # noqa: E402
import enroll as enroll_bench  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from enroll_server.est.wire import decode_certs_only  # noqa: E402
from enroll_server.home.layout import (  # noqa: E402
    HomeLayout,
    hash_secret,
    new_secret,
    registry_location,
)
from enroll_server.home.node import add_node  # noqa: E402
from enroll_server.pki.keys import (  # noqa: E402
    KeyType,
    generate_key,
    private_key_pem,
    signature_hash,
)
from enroll_server.registry import NewDevice, Registry  # noqa: E402
from fleetpki.identity import DeviceId  # noqa: E402
from simulators.soak import _wait_listening as wait_listening  # noqa: E402
from tests.est_client import enroll_headers, request  # noqa: E402
from tests.live_server import make_home  # noqa: E402
from tests.pg_cluster import PASSWORD, PgCluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SETUPS = ("sqlite-1", "pg-1", "pg-2")
EST = "/.well-known/est"


# ------------------------------------------------------------------ CPU from /proc


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 is [0]); None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu(pid: int, children: bool = False) -> float:
    """utime + stime (+ cutime + cstime: the reaped children's) of a process, in seconds."""
    f = _stat(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if children else 0)
    return ticks / TICK


def children_of(parent: int) -> dict[int, str]:
    """Live children of `parent`: pid -> command line (PostgreSQL names its process kinds)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        f = _stat(int(entry.name))
        if f is not None and int(f[1]) == parent:
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            found[int(entry.name)] = cmd
    return found


@dataclass
class PgCpu:
    """A snapshot of a PostgreSQL cluster's CPU: the postmaster (with its reaped children) and
    each live child (client backends apart: they do the registry's queries)."""

    postmaster: float
    children: dict[int, tuple[float, bool]]  # pid -> (cpu, is a client backend)

    @classmethod
    def read(cls, pm: int, dbname: str) -> PgCpu:
        kids = {
            pid: (process_cpu(pid), f" {dbname} " in f" {cmd} ")
            for pid, cmd in children_of(pm).items()
        }
        return cls(process_cpu(pm, children=True), kids)

    def since(self, before: PgCpu) -> tuple[float, float]:
        """(client backends, everything else) spent between `before` and this snapshot."""
        backends = other = 0.0
        for pid, (cpu, client) in self.children.items():
            spent = cpu - before.children.get(pid, (0.0, client))[0]
            if client:
                backends += spent
            else:
                other += spent
        # A child that ended in between: its whole life is now in the postmaster's cutime.
        gone = sum(cpu for pid, (cpu, _) in before.children.items() if pid not in self.children)
        other += self.postmaster - before.postmaster - gone
        return backends, other


def durable(pg: PgCluster, synchronous_commit: str) -> None:
    """tests/pg_cluster.py turns durability off (fsync, full_page_writes: a test cluster loses
    nothing that matters); a benchmark compared with SQLite must not. fsync and full-page
    writes on, as a production cluster runs; synchronous_commit off by default, which is what
    the SQLite registry does (WAL with synchronous=NORMAL, registry/store.py: a power cut
    may lose the last commits, never corrupts)."""
    for setting in (
        "fsync = on",
        "full_page_writes = on",
        f"synchronous_commit = {synchronous_commit}",
    ):
        pg.sql(f"ALTER SYSTEM SET {setting}")
    pg.sql("SELECT pg_reload_conf()")


def postmaster_pid(pg: PgCluster) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def pin_cluster(pg: PgCluster, cpus: set[int] | None) -> None:
    """Put the postmaster and its children on `cpus` (backends forked later inherit it)."""
    if not cpus:
        return
    pm = postmaster_pid(pg)
    for pid in (pm, *children_of(pm)):
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass


# ------------------------------------------------------------------ nodes


@dataclass
class Node:
    home: Path
    proc: subprocess.Popen[bytes]
    est: int
    http: int
    admin: int
    mqtt: int | None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_node(home: Path, cpus: set[int] | None, broker: bool = False) -> Node:
    ports = [enroll_bench.free_port() for _ in range(4)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(home),
         "--est-port", str(ports[0]), "--http-port", str(ports[1]),
         "--admin-port", str(ports[2]),
         *(["--mqtt-port", str(ports[3])] if broker else ["--no-broker"])],
        stdout=subprocess.DEVNULL,
        # FLEETPKI_BENCH_SERVER_LOG=1 shows the nodes' logs (to debug a failing run).
        stderr=None if os.environ.get("FLEETPKI_BENCH_SERVER_LOG") else subprocess.DEVNULL,
        cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )  # fmt: skip
    node = Node(home, proc, ports[0], ports[1], ports[2], ports[3] if broker else None)
    try:
        wait_listening(proc, f"fleetpki serve --home {home}", ports if broker else ports[:3])
    except RuntimeError as exc:
        node.stop()
        raise SystemExit(str(exc)) from None
    return node


@contextmanager
def nodes(homes: list[Path], cpus: set[int] | None, broker: bool = False) -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        for home in homes:
            started.append(start_node(home, cpus, broker))
        yield started
    finally:
        for node in started:
            node.stop()


def homes_for(setup: str, base: Path, pg: PgCluster) -> tuple[list[Path], str | None]:
    """Fresh homes (one per node) for a set-up, and the PostgreSQL database name if any."""
    first = base / "a"
    if setup.startswith("sqlite"):
        make_home(first)
        return [first], None
    url = pg.new_database("bench")
    make_home(first, registry=url.replace(f":{PASSWORD}@", "@"), registry_password=PASSWORD)
    homes = [first]
    if setup.endswith("-2"):
        homes.append(add_node(first, base / "b", ("node-b",), datetime.now(UTC)).layout.root)
    return homes, url.rsplit("/", 1)[1]


def register(home: Path, ids: list[str], tokens: list[str]) -> None:
    now = datetime.now(UTC)
    with Registry.open(registry_location(HomeLayout(home))) as reg:
        reg.create_batch(
            "bench",
            (
                NewDevice(DeviceId(d), hash_secret(t), now + timedelta(days=1))
                for d, t in zip(ids, tokens, strict=True)
            ),
            kind="token",
            token_ttl=timedelta(days=1),
            now=now,
            actor="bench",
        )


# ------------------------------------------------------------------ (a) enrollment


@dataclass
class Pinning:
    server: set[int] | None
    load: set[int] | None

    def describe(self) -> dict[str, Any]:
        if self.server is None:
            return {"server_side": "scheduler", "load_generators": "scheduler"}
        return {"server_side": sorted(self.server), "load_generators": sorted(self.load or ())}


def run_load(
    ports: list[int], root_pem: Path, work: list[tuple[str, str, bytes]], args: Any, pin: Pinning,
    tmp: Path,
) -> tuple[float, dict[str, int], list[float]]:  # fmt: skip
    """bench/enroll.py's load generator, its processes spread over the nodes' ports."""
    procs, outs = [], []
    for i in range(args.load_procs):
        out = tmp / f"load{i}.json"
        outs.append(out)
        procs.append(
            mp.get_context("fork").Process(
                target=enroll_bench.load_process,
                args=(
                    ports[i % len(ports)],
                    str(root_pem),
                    work[i :: args.load_procs],
                    args.concurrency // args.load_procs or 1,
                    str(out),
                    pin.load,
                ),
            )
        )
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    lat: list[float] = []
    for out in outs:
        data = json.loads(out.read_text())
        lat += data["lat"]
        for k, v in data["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return wall, statuses, lat


def enroll_run(
    setup: str, args: Any, pg: PgCluster, csrs: list[tuple[str, bytes]], pin: Pinning
) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix=f"cluster-{setup}-", dir=args.tmp))
    try:
        homes, dbname = homes_for(setup, base, pg)
        tokens = [new_secret() for _ in csrs]
        register(homes[0], [d for d, _ in csrs], tokens)
        work = [(d, t, b) for (d, b), t in zip(csrs, tokens, strict=True)]
        warm, timed = work[: args.warmup], work[args.warmup :]
        root_pem = HomeLayout(homes[0]).root_cert
        pin_cluster(pg, pin.server)
        with nodes(homes, pin.server) as running:
            ports = [n.est for n in running]
            # Untimed: every node's first connections, PostgreSQL's plans and caches.
            run_load(ports, root_pem, warm, args, pin, base)
            pm = postmaster_pid(pg)
            pg0 = PgCpu.read(pm, dbname) if dbname else None
            serve0 = [process_cpu(n.proc.pid) for n in running]
            wall, statuses, lat = run_load(ports, root_pem, timed, args, pin, base)
            serve1 = [process_cpu(n.proc.pid) for n in running]
            pg1 = PgCpu.read(pm, dbname) if dbname else None
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ok = statuses.get("200", 0)
    per = 1000 / max(ok, 1)
    serve = [b - a for a, b in zip(serve0, serve1, strict=True)]
    backends, other = pg1.since(pg0) if pg1 and pg0 else (0.0, 0.0)
    lat.sort()
    return {
        "setup": setup,
        "nodes": len(homes),
        "ok": ok,
        "errors": sum(v for k, v in statuses.items() if k != "200"),
        "statuses": statuses,
        "wall_s": round(wall, 3),
        "enrollments_per_s": round(ok / wall, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2) if lat else None,
        "serve_cpu_ms": round(sum(serve) * per, 3),
        "serve_cpu_ms_by_node": [round(s * per, 3) for s in serve],
        "pg_backends_cpu_ms": round(backends * per, 3),
        "pg_other_cpu_ms": round(other * per, 3),
        "server_side_cpu_ms": round((sum(serve) + backends + other) * per, 3),
    }


# ------------------------------------------------------------------ (b) revocation across nodes


def enroll_for_session(node: Node, device: str, token: str, folder: Path) -> tuple[Path, Path]:
    """One real enrollment through `node`'s EST; the certificate and key files."""
    key = generate_key(KeyType.EC_P256)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device)]))
        .sign(key, signature_hash(key))  # type: ignore[arg-type]
    )
    body = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
    ctx = ssl.create_default_context(cafile=str(HomeLayout(node.home).root_cert))
    reply = request(
        f"https://localhost:{node.est}{EST}/simpleenroll", ctx, "POST", body,
        enroll_headers(device, token),
    )  # fmt: skip
    if reply.status != 200:
        raise SystemExit(
            f"{device}: enrollment through node A refused: {reply.status} {reply.text}"
        )
    (cert,) = [
        c
        for c in decode_certs_only(reply.body)
        if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ]
    cert_path, key_path = folder / f"{device}.pem", folder / f"{device}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_key_pem(key, None))
    return cert_path, key_path


def revoke_through(node: Node, device: str) -> int:
    layout = HomeLayout(node.home)
    token = layout.admin_token.read_text().strip()
    ctx = ssl.create_default_context(cafile=str(layout.root_cert))
    reply = request(
        f"https://localhost:{node.admin}/admin/devices/{device}/revoke", ctx, "POST",
        json.dumps({"reason": "key-compromise"}).encode(),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    return reply.status


async def drops(a: Node, b: Node, devices: list[tuple[str, Path, Path]]) -> dict[str, Any]:
    assert b.mqtt is not None
    chain = HomeLayout(b.home).chain
    ctxs = broker_bench.Contexts(chain)
    sessions = [
        await broker_bench.mqtt_connect(b.mqtt, ctxs.make(cert, key), device)
        for device, cert, key in devices
    ]
    latencies: list[float] = []
    admin_ms: list[float] = []
    for (device, _, _), (reader, _) in zip(devices, sessions, strict=True):
        closed = asyncio.ensure_future(reader.read(1))
        t0 = time.perf_counter()
        status = await asyncio.to_thread(revoke_through, a, device)
        admin_ms.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            raise SystemExit(f"{device}: revoke through node A answered {status}")
        try:
            async with asyncio.timeout(10):
                await closed
            latencies.append(time.perf_counter() - t0)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            latencies.append(float("inf") if not closed.done() else time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    for _, writer in sessions:
        writer.close()
    latencies.sort()
    return {
        "revocations": len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "admin_reply_p50_ms": round(statistics.median(admin_ms), 1),
        "not_dropped_within_10s": sum(1 for x in latencies if x == float("inf")),
    }


def revocation_run(args: Any, pg: PgCluster) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="cluster-drop-", dir=args.tmp))
    try:
        homes, _ = homes_for("pg-2", base, pg)
        ids = [f"drop-{i:04d}" for i in range(args.revocations)]
        tokens = [new_secret() for _ in ids]
        register(homes[0], ids, tokens)
        folder = base / "devices"
        folder.mkdir()
        with nodes(homes, None, broker=True) as (a, b):
            devices = [
                (d, *enroll_for_session(a, d, t, folder)) for d, t in zip(ids, tokens, strict=True)
            ]
            return asyncio.run(drops(a, b, devices))
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ report


@dataclass
class Results:
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in SETUPS})

    def median(self, setup: str, key: str) -> float:
        return round(float(statistics.median(r[key] for r in self.runs[setup])), 3)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=3000, help="timed enrollments per run")
    ap.add_argument("--warmup", type=int, default=200, help="untimed enrollments first")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each set-up, alternately")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--load-procs", type=int, default=2)
    ap.add_argument("--revocations", type=int, default=100)
    ap.add_argument("--setups", default=",".join(SETUPS), help="a comma-separated subset")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "bench/results/cluster.json"))
    ap.add_argument("--tmp", default=None, help="parent of the temporary homes")
    ap.add_argument(
        "--synchronous-commit",
        choices=("off", "on"),
        default="off",
        help="PostgreSQL's synchronous_commit (off: as durable as the SQLite registry)",
    )
    args = ap.parse_args()
    setups = [s for s in args.setups.split(",") if s]
    if unknown := set(setups) - set(SETUPS):
        ap.error(f"unknown set-up(s) {sorted(unknown)}; choose from {', '.join(SETUPS)}")

    all_cpus = os.sched_getaffinity(0)
    pinned = not args.no_pin and len(all_cpus) >= 2
    pin = Pinning(
        {max(all_cpus)} if pinned else None, (all_cpus - {max(all_cpus)}) if pinned else None
    )
    print(f"making {args.warmup + args.n} CSRs (untimed)...", flush=True)
    csrs = enroll_bench.make_csrs(args.warmup + args.n)
    pg = PgCluster.start()
    results = Results()
    try:
        durable(pg, args.synchronous_commit)
        settings = {
            name: pg.sql(f"SHOW {name}")
            for name in ("fsync", "full_page_writes", "synchronous_commit", "shared_buffers")
        }
        for r in range(args.rounds):
            for setup in setups:
                run = enroll_run(setup, args, pg, csrs, pin)
                results.runs[setup].append(run)
                print(
                    f"round {r + 1} {setup:<9} {run['enrollments_per_s']:>7}/s  server side "
                    f"{run['server_side_cpu_ms']} ms/enrollment (serve {run['serve_cpu_ms']}, "
                    f"PostgreSQL {run['pg_backends_cpu_ms']} + {run['pg_other_cpu_ms']}), "
                    f"{run['errors']} errors",
                    flush=True,
                )
        drop = revocation_run(args, pg) if args.revocations else None
    finally:
        pg.stop()

    keys = ("enrollments_per_s", "serve_cpu_ms", "pg_backends_cpu_ms", "pg_other_cpu_ms",
            "server_side_cpu_ms", "p50_ms", "p99_ms", "errors")  # fmt: skip
    summary = {s: {k: results.median(s, k) for k in keys} for s in setups}
    # Each round runs every set-up back to back: the ratio within a round, then the median of
    # the rounds, is what the machine's drift between rounds moves least.
    ratio = None
    if "sqlite-1" in summary:
        ratio = {
            s: round(
                statistics.median(
                    r["server_side_cpu_ms"] / b["server_side_cpu_ms"]
                    for r, b in zip(results.runs[s], results.runs["sqlite-1"], strict=True)
                ),
                2,
            )
            for s in setups
        }
    result = {
        "benchmark": "cluster",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{enroll_bench.cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}, PostgreSQL {pg_version()}",
        "niceness": os.nice(0),
        "postgresql_settings": settings,
        "pinning": pin.describe(),
        "n": args.n,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "median": summary,
        # serve + PostgreSQL, over sqlite-1's in the same round; median of the rounds.
        "server_side_cpu_vs_sqlite": ratio,
        "revocation_to_drop_across_nodes": drop,
        "runs": results.runs,
    }
    print()
    print(f"{'median of ' + str(args.rounds):<22}" + "".join(f"{s:>12}" for s in setups))
    print("-" * (22 + 12 * len(setups)))
    for key in keys:
        print(f"{key:<22}" + "".join(f"{summary[s][key]:>12}" for s in setups))
    if ratio:
        print(f"{'server side / sqlite':<22}" + "".join(f"{ratio[s]:>12}" for s in setups))
    print(f"pinning: {pin.describe()} (every node of a set-up and PostgreSQL share server_side)")
    if drop:
        print(
            f"\nrevocation through node A to drop on node B's broker, {drop['revocations']}: "
            f"p50 {drop['p50_ms']} ms, p99 {drop['p99_ms']} ms, max {drop['max_ms']} ms "
            f"(admin reply p50 {drop['admin_reply_p50_ms']} ms)"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


def pg_version() -> str:
    from tests.pg_cluster import PG_BIN

    out = subprocess.run([str(PG_BIN / "postgres"), "--version"], capture_output=True, text=True)
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    words = out.stdout.split()
    return words[2] if len(words) > 2 else out.stdout.strip()


if __name__ == "__main__":
    main()
