"""Benchmark: EST enrollments/s and server CPU per enrollment, issuing CA key in SoftHSM2 vs
in a file, same run.

    nice -n 19 .venv/bin/python bench/hsm.py [--n 1500] [--rounds 2] [--concurrency 16]
                                             [--json bench/results/hsm.json]

Two homes made by `fleetpki init` (one with `--ca-key pkcs11:...` on a throwaway SoftHSM2
token, one with the encrypted key file), each served by a real `fleetpki serve --no-broker`
process whose CPU time is read with psutil; the load generators are bench/enroll.py's (a
fresh, fully verified TLS connection per enrollment, in --load-procs processes). The two
alternate `--rounds` times with fresh devices, so that both see the same machine; the
result is each one's median round.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
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
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import enroll as enroll_bench  # noqa: E402

from enroll_server.home.layout import HomeLayout, hash_secret, new_secret, registry_location  # noqa: E402
from enroll_server.pki.keys import KeyType, generate_key, signature_hash  # noqa: E402
from enroll_server.registry import NewDevice, Registry  # noqa: E402
from fleetpki.identity import DeviceId  # noqa: E402

PIN = "bench-pin-1"


def softhsm(tmp: Path) -> dict[str, str]:
    """A SoftHSM2 configuration of its own with one token, 'bench'; the environment to use it."""
    tokens = tmp / "tokens"
    tokens.mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "FLEETPKI_PKCS11_PIN": PIN}
    init_token = ["softhsm2-util", "--init-token", "--free", "--label", "bench"]
    subprocess.run(
        [*init_token, "--pin", PIN, "--so-pin", "so-" + PIN],
        check=True,
        capture_output=True,
        env=env,
    )
    return env


def init(home: Path, env: dict[str, str], *extra: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", "init", "--home", str(home), *extra],
        check=True,
        capture_output=True,
        env=env,
        cwd=ROOT,
    )


def register(home: Path, csrs: list[tuple[str, bytes]], batch: str) -> list[str]:
    tokens = [new_secret() for _ in csrs]
    now = datetime.now(UTC)
    with Registry.open(registry_location(HomeLayout(home))) as reg:
        reg.create_batch(
            batch,
            (
                NewDevice(DeviceId(d), hash_secret(t), now + timedelta(days=1))
                for (d, _), t in zip(csrs, tokens, strict=True)
            ),
            kind="token",
            token_ttl=timedelta(days=1),
            now=now,
            actor="bench",
        )
    return tokens


def make_csrs(prefix: str, n: int) -> list[tuple[str, bytes]]:
    """n (device id, base64 CSR) pairs named prefix-000000...: EC P-256, CN = the id."""
    out = []
    for i in range(n):
        did = f"{prefix}-{i:06d}"
        key = generate_key(KeyType.EC_P256)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, did)]))
            .sign(key, signature_hash(key))
        )
        out.append((did, base64.b64encode(csr.public_bytes(serialization.Encoding.DER))))
    return out


def run_once(
    home: Path,
    env: dict[str, str],
    csrs: list[tuple[str, bytes]],
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, float]:
    tokens = register(home, csrs, f"b{time.monotonic_ns()}")
    est, http, admin = (enroll_bench.free_port() for _ in range(3))
    ports = ["--est-port", str(est), "--http-port", str(http), "--admin-port", str(admin)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enroll_server.cli",
            "serve",
            "--home",
            str(home),
            *ports,
            "--no-broker",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", est), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"server for {home} did not start") from None
                time.sleep(0.1)
        ps = psutil.Process(proc.pid)
        cpu0 = ps.cpu_times()
        work = [(d, t, b) for (d, b), t in zip(csrs, tokens, strict=True)]
        parts = [work[i :: args.load_procs] for i in range(args.load_procs)]
        outs = [str(tmp / f"load{i}.json") for i in range(args.load_procs)]
        root_pem = str(HomeLayout(home).root_cert)
        t0 = time.perf_counter()
        procs = [
            mp.get_context("fork").Process(
                target=enroll_bench.load_process,
                args=(est, root_pem, part, args.concurrency // args.load_procs or 1, out, None),
            )
            for part, out in zip(parts, outs, strict=True)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t0
        cpu1 = ps.cpu_times()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    ok = 0
    for out in outs:
        statuses = json.loads(Path(out).read_text())["statuses"]
        ok += statuses.get("200", 0)
        if set(statuses) - {"200"}:
            print(f"  statuses: {statuses}", flush=True)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"ok": ok, "sent": len(work), "per_s": ok / wall, "cpu_ms": 1000 * cpu / max(ok, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1500, help="enrollments per round and home")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--load-procs", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "bench/results/hsm.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleetpki-bench-hsm-"))
    atexit.register(shutil.rmtree, tmp, True)
    env = softhsm(tmp)
    homes = {"file": tmp / "file-home", "softhsm2": tmp / "hsm-home"}
    init(homes["file"], env)
    init(homes["softhsm2"], env, "--ca-key", "pkcs11:token=bench;object=issuing")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in homes}
    for r in range(args.rounds):
        for name, home in homes.items():
            print(f"round {r + 1}: {name} ({args.n} CSRs)...", flush=True)
            csrs = make_csrs(f"{name}-{r}", args.n)
            runs[name].append(run_once(home, env, csrs, args, tmp))
            print(f"  {runs[name][-1]}", flush=True)
    result = {
        "benchmark": "hsm",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{enroll_bench.cpu_model()}, {os.cpu_count()} cores",
        "n": args.n,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "results": {
            name: {
                "enrollments_per_s": round(statistics.median(x["per_s"] for x in rs), 1),
                "server_cpu_ms_per_enrollment": round(
                    statistics.median(x["cpu_ms"] for x in rs), 3
                ),
                "failed": sum(x["sent"] - x["ok"] for x in rs),
            }
            for name, rs in runs.items()
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["results"], indent=2))


if __name__ == "__main__":
    main()
