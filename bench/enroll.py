"""Benchmark: EST simpleenroll throughput and server CPU per enrollment vs the raw floor.

    .venv/bin/python bench/enroll.py [--n 3000] [--concurrency 32]
                                     [--json bench/results/enroll.json] [--profile OUT]
                                     [--server fleetpki|bare|minimal|aiohttp|aiohttp-uvloop]
                                     [--fleet N] [--shuffle] [--no-pin] [--phases]

The server runs as a real `fleetpki serve --no-broker` process (its CPU time is read with
psutil); the load generator runs in --load-procs processes on the same machine with a fresh,
fully verified TLS connection per enrollment, as devices do. N CSRs and N tokens are made
before the timed window. In the same run (before and after the load, in chunks; their
median) the *raw floor* is measured in this process: one in-memory server-side TLS handshake
with the server's own TLS context (same certificate, client certificate requested, no session
tickets), CSR load + signature check, and certificate build + sign with cryptography - what
any EST server must spend. `--fleet N` registers N already-enrolled devices first (a
registry of a real fleet's size); `--shuffle` enrolls in random order. `--profile OUT`
samples the server during the load with py-spy (raw stacks) or, for OUT ending in .data,
`perf record`. `--phases` runs the server under bench/phased_serve.py and prints its CPU per
enrollment phase by phase, next to the floor's two parts.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from enroll_server.enrollment.service import certificate_pem  # noqa: E402
from enroll_server.home.layout import LoadedHome, hash_secret, load_home, new_secret  # noqa: E402
from enroll_server.pki.csr_policy import signature_valid  # noqa: E402
from enroll_server.pki.keys import KeyType, generate_key, signature_hash  # noqa: E402
from enroll_server.pki.profile import DeviceProfile, build_device_certificate  # noqa: E402
from enroll_server.pki.template import CertificateTemplate  # noqa: E402
from enroll_server.registry import NewDevice, Registry  # noqa: E402
from enroll_server.registry.models import Issuance, IssuedCertificate  # noqa: E402
from enroll_server.transport.loop import install_fast_loop  # noqa: E402
from enroll_server.web.app import server_ssl_context  # noqa: E402
from fleetpki.identity import DeviceId  # noqa: E402
from tests.live_server import make_home  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_csrs(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        did = f"bench-{i:06d}"
        key = generate_key(KeyType.EC_P256)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, did)]))
            .sign(key, signature_hash(key))
        )
        out.append((did, base64.b64encode(csr.public_bytes(serialization.Encoding.DER))))
    return out


# The floor is measured in chunks before and after the load; the run uses their median.
FLOOR_CHUNKS = 5
FLOOR_ROUNDS = 60


def raw_floor(
    home: Path, csrs: list[tuple[str, bytes]], rounds: int = 300
) -> tuple[float, float, float]:
    """CPU seconds per enrollment: (server-side handshake, CSR load/verify + issue, the same
    done as the server does it).

    The floor is the issue's: cryptography's `is_signature_valid` and CertificateBuilder
    (`build_device_certificate`). The server verifies with the key it already loaded and
    signs a template's TBS (pki/template.py), which is cheaper than that; the third figure is
    that cheaper path, so the ratio can also be read against the server's own way of doing
    the floor's work (`ratio_vs_own_floor`)."""
    loaded = load_home(home)
    layout = loaded.layout
    # The server's own TLS context, as `fleetpki serve` builds it: the floor's handshake is the
    # one the server must do. That includes the CertificateRequest (RFC 8446 4.3.2; EST's
    # simplereenroll authenticates with a client certificate on the same port, RFC 7030 3.3.2)
    # and the client's empty Certificate in reply, and excludes session tickets (the server
    # sends none, so the floor mints none: counting them would flatter the ratio).
    sctx = server_ssl_context(layout.server_cert, layout.server_key, layout.chain)
    cctx = ssl.create_default_context(cafile=str(layout.root_cert))
    profile = DeviceProfile()
    template = CertificateTemplate(loaded.issuer)
    spent = 0.0
    own = 0.0
    handshake = 0.0
    for i in range(rounds):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = cctx.wrap_bio(c_in, c_out, server_hostname="localhost")
        server = sctx.wrap_bio(s_in, s_out, server_side=True)
        done_c = done_s = False
        while not (done_c and done_s):
            if not done_c:
                try:
                    client.do_handshake()
                    done_c = True
                except ssl.SSLWantReadError:
                    pass
            if c_out.pending:
                s_in.write(c_out.read())
            if not done_s:
                t = time.process_time()
                try:
                    server.do_handshake()
                    done_s = True
                except ssl.SSLWantReadError:
                    pass
                handshake += time.process_time() - t
            if s_out.pending:
                c_in.write(s_out.read())
        did, b64 = csrs[i % len(csrs)]
        # The two ways in turn, each first in every other round: neither always finds the
        # other's code and data warm in the caches.
        for way in (i % 2, 1 - i % 2):
            t = time.process_time()
            csr = x509.load_der_x509_csr(base64.b64decode(b64))
            if way == 0:
                assert csr.is_signature_valid
                build_device_certificate(
                    csr.public_key(),
                    DeviceId(did),
                    loaded.issuer,
                    datetime.now(UTC),
                    profile,  # type: ignore[arg-type]
                )
                spent += time.process_time() - t
            else:
                public_key = csr.public_key()
                assert signature_valid(csr, public_key)
                template.issue(public_key, DeviceId(did), datetime.now(UTC), profile)  # type: ignore[arg-type]
                own += time.process_time() - t
    return handshake / rounds, spent / rounds, own / rounds


def enrolled_fleet(loaded: LoadedHome, n: int, now: datetime, chunk: int = 2000) -> None:
    """Register `n` devices and record one issuance for each, as if the fleet had enrolled.

    The certificate rows carry random serials and fingerprints (the registry's indexes see the
    same spread as real ones) and one real certificate's PEM (nothing reads it in the run).
    """
    key = generate_key(KeyType.EC_P256)
    pem = certificate_pem(
        build_device_certificate(
            key.public_key(),  # type: ignore[arg-type]
            DeviceId("fleet-template"),
            loaded.issuer,
            now,
            DeviceProfile(),
        ).public_bytes(serialization.Encoding.DER)
    )
    with Registry.open(loaded.layout.registry) as reg:
        for start in range(0, n, chunk):
            ids = [DeviceId(f"fleet-{i:07d}") for i in range(start, min(n, start + chunk))]
            hashes = [hash_secret(new_secret()) for _ in ids]
            reg.create_batch(
                f"fleet-{start // chunk:04d}",
                (
                    NewDevice(d, h, now + timedelta(days=1))
                    for d, h in zip(ids, hashes, strict=True)
                ),
                kind="token",
                token_ttl=timedelta(days=1),
                now=now,
                actor="bench",
            )
            outcomes = reg.record_issuances(
                [
                    Issuance(
                        IssuedCertificate(
                            serial=int.from_bytes(os.urandom(16), "big") | 1 << 127,
                            device_id=d,
                            fingerprint_sha256=os.urandom(32).hex(),
                            not_before=now - timedelta(hours=1),
                            not_after=now + timedelta(days=30),
                            pem=pem,
                        ),
                        h,
                        None,
                        now,
                        "device",
                    )
                    for d, h in zip(ids, hashes, strict=True)
                ]
            )
            if any(o is not None for o in outcomes):
                raise SystemExit(f"fleet set-up refused: {outcomes}")


async def one_enroll(
    port: int, ctx: ssl.SSLContext, did: str, token: str, body: bytes
) -> tuple[int, float]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    auth = base64.b64encode(f"{did}:{token}".encode()).decode()
    head = (
        f"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost:{port}\r\n"
        f"Authorization: Basic {auth}\r\nContent-Type: application/pkcs10\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    writer.write(head + body)
    status_line = await reader.readline()
    await reader.read()  # until close
    if not status_line:
        return -2, time.perf_counter() - started  # closed without a reply
    writer.close()
    try:
        await writer.wait_closed()
    except (ssl.SSLError, ConnectionError):
        pass
    return int(status_line.split()[1]), time.perf_counter() - started


async def load(
    port: int, ctx: ssl.SSLContext, work: list[tuple[str, str, bytes]], concurrency: int
) -> tuple[list[float], dict[int, int]]:
    queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def worker() -> None:
        while not queue.empty():
            did, token, body = queue.get_nowait()
            try:
                status, lat = await one_enroll(port, ctx, did, token, body)
            except (OSError, ssl.SSLError):
                status, lat = -1, 0.0
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(lat)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, statuses


def load_process(
    port: int,
    root_pem: str,
    work: list[tuple[str, str, bytes]],
    concurrency: int,
    out: str,
    cpus: set[int] | None,
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    # The client side must stay honest (full chain and hostname verification, a fresh
    # connection each time) but should not waste the CPU it shares with the server: uvloop,
    # when installed, drives client TLS in C.
    install_fast_loop()
    ctx = ssl.create_default_context(cafile=root_pem)
    cpu = time.process_time()
    lat, statuses = asyncio.run(load(port, ctx, work, concurrency))
    cpu = time.process_time() - cpu
    Path(out).write_text(json.dumps({"lat": lat, "statuses": statuses, "cpu": cpu}))


def commit_batch(admin_port: int, home: Path) -> float | None:
    """Mean issuances per registry transaction (group commit), from the server's /metrics
    (on the admin listener, with the admin token)."""
    layout = load_home(home).layout
    ctx = ssl.create_default_context(cafile=str(layout.root_cert))
    token = layout.admin_token.read_text().strip()
    head = (
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(head.encode())
            text = b""
            while chunk := tls.recv(65536):
                text += chunk
    values = {}
    for line in text.decode().splitlines():
        for name in ("sum", "count"):
            if line.startswith(f"fleetpki_registry_commit_batch_{name} "):
                values[name] = float(line.split()[1])
    if not values.get("count"):
        return None
    return round(values["sum"] / values["count"], 2)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--load-procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--json", default=str(ROOT / "bench/results/enroll.json"))
    ap.add_argument(
        "--server",
        choices=("fleetpki", "bare", "minimal", "aiohttp", "aiohttp-uvloop"),
        default="fleetpki",
        help="fleetpki: `fleetpki serve --no-broker`; bare: bench/bare_est_server.py, the same "
        "TLS and HTTP layer with only the floor's work behind it (calibration); minimal: "
        "bench/minimal_est_server.py, the least a Python server can do per connection; aiohttp "
        "(-uvloop): bench/aiohttp_est_server.py, the issue's own calibration (a bare aiohttp "
        "handler doing only the floor's work)",
    )
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place the server and the load generators (default: the server "
        "and the floor on the last core, the load generators on the others)",
    )
    ap.add_argument(
        "--phases",
        action="store_true",
        help="run the server under bench/phased_serve.py and print where its CPU per "
        "enrollment goes, phase by phase (timers on the hot path: a little slower)",
    )
    ap.add_argument(
        "--profile",
        metavar="OUT",
        help="sample the server during the timed window: py-spy raw stacks, or perf record "
        "(OUT ending in .data), or strace -c syscall counts (OUT ending in .strace)",
    )
    ap.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help="register N more devices before the run, each already enrolled once (a device row, "
        "a spent token, a certificate row, an audit row): the registry at the size of a real "
        "fleet instead of the N fresh bench devices alone",
    )
    ap.add_argument(
        "--shuffle",
        action="store_true",
        help="enroll the bench devices in random order, as a fleet comes online, instead of "
        "in the order they were registered (which keeps the registry's writes on few pages)",
    )
    args = ap.parse_args()
    if args.phases and args.server != "fleetpki":
        ap.error("--phases times `fleetpki serve` (--server fleetpki)")

    tmp = Path(tempfile.mkdtemp(prefix="fleetpki-bench-"))
    # The home, its registry and the load generators' results: ~10 MB a run, never reused.
    atexit.register(shutil.rmtree, tmp, True)
    home = tmp / "home"
    make_home(home)
    print(f"making {args.n} CSRs and tokens (untimed)...", flush=True)
    csrs = make_csrs(args.n)
    tokens = [new_secret() for _ in csrs]
    now = datetime.now(UTC)
    with Registry.open(load_home(home).layout.registry) as reg:
        reg.create_batch(
            "bench",
            (
                NewDevice(DeviceId(d), hash_secret(t), now + timedelta(days=1))
                for (d, _), t in zip(csrs, tokens, strict=True)
            ),
            kind="token",
            token_ttl=timedelta(days=1),
            now=now,
            actor="bench",
        )
    if args.fleet:
        print(f"registering a fleet of {args.fleet} enrolled devices (untimed)...", flush=True)
        enrolled_fleet(load_home(home), args.fleet, now)
    # The server gets a core of its own, as it would on a real host; the load generators share
    # the others. Co-scheduled on both cores they evict the server's caches and preempt it,
    # which inflates its CPU per enrollment with noise that is not the server's own work.
    # The floor is measured on the server's core, so both see the same core.
    ncpu = len(os.sched_getaffinity(0))
    pin = not args.no_pin and ncpu >= 2
    all_cpus = os.sched_getaffinity(0)
    server_cpus = {max(all_cpus)} if pin else None
    load_cpus = (all_cpus - {max(all_cpus)}) if pin else None

    def floor_on_server_core() -> list[tuple[float, float, float]]:
        """The floor in FLOOR_CHUNKS separate measurements (after a warm-up): the run takes
        their median, which one spell of noise from other guests on the host cannot move."""
        if server_cpus:
            os.sched_setaffinity(0, server_cpus)
        try:
            raw_floor(home, csrs, rounds=20)  # warm-up, discarded
            return [raw_floor(home, csrs, rounds=FLOOR_ROUNDS) for _ in range(FLOOR_CHUNKS)]
        finally:
            os.sched_setaffinity(0, all_cpus)

    split_before = floor_on_server_core()

    est, http, admin = free_port(), free_port(), free_port()
    phases_out = tmp / "phases.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            *(
                [str(ROOT / "bench/phased_serve.py"), "--phases-out", str(phases_out)]
                if args.phases
                else ["-m", "enroll_server.cli", "serve"]
                if args.server == "fleetpki"
                else [
                    str(ROOT / f"bench/{args.server.split('-')[0]}_est_server.py"),
                    *(["--uvloop"] if args.server.endswith("-uvloop") else []),
                ]
            ),
            "--home",
            str(home),
            "--est-port",
            str(est),
            "--http-port",
            str(http),
            *(["--admin-port", str(admin)] if args.server == "fleetpki" or args.phases else []),
            "--no-broker",
        ],
        stdout=subprocess.DEVNULL,
        # FLEETPKI_BENCH_SERVER_LOG=1 shows the server's log (to debug a failing run).
        stderr=None if os.environ.get("FLEETPKI_BENCH_SERVER_LOG") else subprocess.DEVNULL,
        cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus)) if server_cpus else None,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", est), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start") from None
                time.sleep(0.1)
        ps = psutil.Process(proc.pid)
        spy = None
        if args.profile:
            # OUT.data: `perf record` (all native code and the kernel); else py-spy raw stacks.
            sampler = (
                ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o", args.profile]
                if args.profile.endswith(".data")
                else ["strace", "-f", "-c", "-o", args.profile]
                if args.profile.endswith(".strace")
                else [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    args.profile,
                ]
            )
            spy = subprocess.Popen(
                [*sampler, "-p" if sampler[0] == "strace" else "--pid", str(proc.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        cpu0 = ps.cpu_times()
        work = [(d, t, b) for (d, b), t in zip(csrs, tokens, strict=True)]
        if args.shuffle:
            random.Random(args.n).shuffle(work)
        parts = [work[i :: args.load_procs] for i in range(args.load_procs)]
        outs = [str(tmp / f"load{i}.json") for i in range(args.load_procs)]
        t0 = time.perf_counter()
        # Load generators in their own processes: one Python process cannot drive TLS handshakes
        # fast enough to saturate the server.
        import multiprocessing as mp

        procs = [
            mp.get_context("fork").Process(
                target=load_process,
                args=(
                    est,
                    str(load_home(home).layout.root_cert),
                    part,
                    args.concurrency // args.load_procs or 1,
                    out,
                    load_cpus,
                ),
            )
            for part, out in zip(parts, outs, strict=True)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t0
        cpu1 = ps.cpu_times()
        batch = commit_batch(admin, home) if args.server == "fleetpki" else None
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    # Again after the load, and the median of all: other work on a shared machine shifts CPU
    # cost per operation over time; the floor should see the same conditions the server did.
    split_after = floor_on_server_core()
    floor_before = statistics.median(c[0] + c[1] for c in split_before)
    floor_after = statistics.median(c[0] + c[1] for c in split_after)
    floor = statistics.median(c[0] + c[1] for c in split_before + split_after)
    floor_handshake = statistics.median(c[0] for c in split_before + split_after)
    own_floor = statistics.median(c[0] + c[2] for c in split_before + split_after)
    lat: list[float] = []
    statuses: dict[str, int] = {}
    load_cpu = 0.0
    for out in outs:
        data = json.loads(Path(out).read_text())
        lat += data["lat"]
        load_cpu += data["cpu"]
        for k, v in data["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    ok = statuses.get("200", 0)
    errors = sum(v for k, v in statuses.items() if k != "200")
    server_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    per_enroll = server_cpu / max(ok, 1)
    lat.sort()
    result = {
        "benchmark": "enroll",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}",
        # `fleetpki serve` runs on uvloop when installed (enroll_server.transport.loop); so does
        # the load generator.
        "event_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "pinned": {"server_cpus": sorted(server_cpus), "load_cpus": sorted(load_cpus or ())}
        if server_cpus
        else None,
        "server": args.server,
        "n": args.n,
        "concurrency": args.concurrency,
        "ok": ok,
        "errors": errors,
        "statuses": statuses,
        "wall_s": round(wall, 3),
        "enrollments_per_s": round(ok / wall, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2) if lat else None,
        "server_cpu_ms_per_enrollment": round(per_enroll * 1000, 3),
        "server_user_ms": round((cpu1.user - cpu0.user) / max(ok, 1) * 1000, 3),
        "server_sys_ms": round((cpu1.system - cpu0.system) / max(ok, 1) * 1000, 3),
        "load_generator_cpu_ms_per_enrollment": round(load_cpu / max(ok, 1) * 1000, 3),
        "raw_floor_cpu_ms": round(floor * 1000, 3),
        "raw_floor_before_after_ms": [round(floor_before * 1000, 3), round(floor_after * 1000, 3)],
        "raw_floor_handshake_ms": round(floor_handshake * 1000, 3),
        "ratio_vs_floor": round(per_enroll / floor, 2),
        "own_floor_cpu_ms": round(own_floor * 1000, 3),
        "ratio_vs_own_floor": round(per_enroll / own_floor, 2),
        "mean_commit_batch": batch,
        "fleet": args.fleet,
        "shuffled": args.shuffle,
    }
    if args.phases:
        phases = json.loads(phases_out.read_text())
        result["phases_us_per_enrollment"] = {
            name: round(p["seconds"] / max(ok, 1) * 1e6, 1) for name, p in phases.items()
        }
    print()
    print(f"{'metric':<32}{'value':>14}")
    print("-" * 46)
    for key in (
        "n",
        "concurrency",
        "ok",
        "errors",
        "wall_s",
        "enrollments_per_s",
        "p50_ms",
        "p99_ms",
        "server_cpu_ms_per_enrollment",
        "server_user_ms",
        "server_sys_ms",
        "load_generator_cpu_ms_per_enrollment",
        "raw_floor_cpu_ms",
        "ratio_vs_floor",
        "own_floor_cpu_ms",
        "ratio_vs_own_floor",
        "mean_commit_batch",
    ):
        print(f"{key:<32}{result[key]!s:>14}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.phases:
        total_us = per_enroll * 1e6
        print(f"\n{'phase (nested by indent)':<58}{'us/enroll':>10}{'share':>8}")
        print("-" * 76)
        outer = 0.0
        for name, us in result["phases_us_per_enrollment"].items():
            print(f"{name:<58}{us:>10.1f}{us / total_us:>8.1%}")
            if not name.startswith(" "):
                outer += us
        rest = total_us - outer
        print(
            f"{'rest: accept, TLS handshake, reads, event loop, threads':<58}{rest:>10.1f}"
            f"{rest / total_us:>8.1%}"
        )
        for label, us in (
            ("raw floor, in memory: TLS handshake (server side)", floor_handshake * 1e6),
            ("raw floor, in memory: CSR load + verify + sign", (floor - floor_handshake) * 1e6),
            ("  the same, as the server does it (template)", (own_floor - floor_handshake) * 1e6),
        ):
            print(f"{label:<58}{us:>10.1f}{us / total_us:>8.1%}")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
