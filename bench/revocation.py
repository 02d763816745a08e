"""Benchmark: CRL build, OCSP throughput, and revocation-to-refusal on a real mosquitto.

    .venv/bin/python bench/revocation.py [--fleet 10000] [--ocsp-seconds 5] [--rounds 5]
                                         [--json bench/results/revocation.json]

- CRL build + sign (enroll_server.pki.crl.build_crl) at 10k and 100k entries, next to the
  naive `add_revoked_certificate` loop at 10k and 30k (it copies the list on every call,
  so it grows quadratically; the CRL entries are prebuilt there, so it is signing alone). Target:
  <= 2 s at 100k. Plus the publisher's full rebuild from a real registry of --fleet revoked
  certificates (SQL read + build + sign), what runs on every revocation.
- OCSP responses/s over HTTP keep-alive: the real aiohttp handlers in a child process pinned
  to one core, a lean keep-alive HTTP/1.1 load generator pinned to the other; reported per
  CPU-second the server used (what one core sustains, robust to other load on the machine)
  and per wall-clock second. Next to it, in this process, the raw floor: `respond()` (parse,
  lookup, build, sign) and a bare cryptography OCSPResponseBuilder build+sign. Target:
  >= 2,000/s on one core.
- revocation-to-refusal on mosquitto 2.0: a broker started from `mosquitto-config`,
  `MosquittoSync.run` polling every 0.2 s, a registry holding --fleet revoked certificates;
  per round a connected device is revoked in the registry and we time (a) until its live
  session is dropped and (b) until a new connection of it is refused. Target: <= 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.x509 import ocsp  # noqa: E402

from enroll_server.broker.mosquitto_cli import app as mosquitto_app  # noqa: E402
from enroll_server.broker.mosquitto_config import MosquittoFiles  # noqa: E402
from enroll_server.broker.mosquitto_dynsec import open_control  # noqa: E402
from enroll_server.broker.mosquitto_sync import MosquittoSync, read_cursor, read_pid  # noqa: E402
from enroll_server.home.layout import load_home  # noqa: E402
from enroll_server.pki.ca import Issuer  # noqa: E402
from enroll_server.pki.crl import build_crl, revoked_certificate  # noqa: E402
from enroll_server.pki.keys import load_private_key_pem, private_key_pem  # noqa: E402
from enroll_server.pki.ocsp import CertStatusInfo, OcspResponder, respond  # noqa: E402
from enroll_server.pki.serial import new_serial  # noqa: E402
from enroll_server.registry import Registry, RevokedEntry  # noqa: E402
from enroll_server.revocation.publisher import CrlPublisher  # noqa: E402
from fleetpki.identity import DeviceId  # noqa: E402
from tests.integration.revocation_support import Fleet, free_port  # noqa: E402
from tests.live_server import make_home  # noqa: E402
from tests.pki_helpers import URLS, MemoryCa, make_ca  # noqa: E402

NOW = datetime.now(UTC)


# ------------------------------------------------------------------------------- CRL


def _entries(n: int) -> list[RevokedEntry]:
    reasons = ("keyCompromise", "unspecified", "superseded", "cessationOfOperation")
    return [RevokedEntry(new_serial(), NOW, reasons[i % 4]) for i in range(n)]


def bench_crl(ca: MemoryCa) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, runs in ((10_000, 5), (100_000, 2)):
        entries = _entries(n)
        times = []
        size = 0
        for _ in range(runs):
            t0 = time.perf_counter()
            crl = build_crl(
                ca.issuing.cert, ca.issuing.key, entries, 1, NOW, timedelta(hours=24), URLS.crl
            )
            der = crl.public_bytes(serialization.Encoding.DER)
            times.append(time.perf_counter() - t0)
            size = len(der)
        out[f"build_{n}"] = {"median_s": statistics.median(times), "runs": runs, "der_bytes": size}
    # The naive way, for comparison: every add copies the list, so time grows quadratically.
    for n in (10_000, 30_000):
        revoked = [revoked_certificate(e) for e in _entries(n)]
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.issuing.cert.subject)
            .last_update(NOW)
            .next_update(NOW + timedelta(hours=24))
        )
        t0 = time.perf_counter()
        for entry in revoked:
            builder = builder.add_revoked_certificate(entry)
        builder.sign(ca.issuing.key, hashes.SHA256())
        out[f"naive_add_revoked_{n}_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------- OCSP


def _ocsp_server(folder: str, port_out: Any, cpu: int | None, fast_loop: bool) -> None:
    """Child process: the real handlers on 127.0.0.1:0, registry-backed, one core."""
    from aiohttp import web

    from enroll_server.revocation.routes import revocation_routes
    from enroll_server.revocation.state import RevocationState
    from enroll_server.transport.loop import install_fast_loop

    if fast_loop:
        install_fast_loop()  # what `fleetpki serve` does
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    base = Path(folder)
    cert = x509.load_pem_x509_certificate((base / "issuing.pem").read_bytes())
    key = load_private_key_pem((base / "issuing.key").read_bytes(), None)
    registry = Registry.open(base / "registry.db")
    state = RevocationState.from_registry(registry, Issuer(cert, key, URLS))

    async def main() -> None:
        app = web.Application()
        app.add_routes(revocation_routes(state))
        state.attach(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_out.send(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def _load(port: int, bodies: list[bytes], seconds: float, conns: int) -> tuple[int, int]:
    """Keep-alive HTTP/1.1 POSTs on `conns` connections for `seconds`; (ok, errors)."""
    heads = [
        (
            f"POST /ocsp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]
    deadline = time.perf_counter() + seconds
    counts = [0, 0]

    async def worker(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        while time.perf_counter() < deadline:
            writer.write(heads[i % len(heads)])
            i += 1
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            ok = status.startswith(b"HTTP/1.1 200") and body[:2] == b"\x30\x82"
            counts[0 if ok else 1] += 1
        writer.close()

    await asyncio.gather(*(worker(k) for k in range(conns)))
    return counts[0], counts[1]


def bench_ocsp(ca: MemoryCa, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        registry = Registry.open(folder / "registry.db")
        fleet = Fleet(ca, registry, folder)
        certs = [fleet.enroll(f"ocsp-bench-{i}") for i in range(200)]
        for i in range(0, 200, 4):
            registry.revoke_device(
                DeviceId(f"ocsp-bench-{i}"), reason="keyCompromise", now=NOW, actor="bench"
            )
        unknown = [ca.device_cert(f"ocsp-unknown-{i}")[0] for i in range(20)]
        (folder / "issuing.pem").write_bytes(
            ca.issuing.cert.public_bytes(serialization.Encoding.PEM)
        )
        (folder / "issuing.key").write_bytes(private_key_pem(ca.issuing.key, None))
        bodies = [
            ocsp.OCSPRequestBuilder()
            .add_certificate(c, ca.issuing.cert, hashes.SHA1())
            .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
            .build()
            .public_bytes(serialization.Encoding.DER)
            for c in certs + unknown
        ]
        cpus = sorted(os.sched_getaffinity(0))
        server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
        rates: dict[str, float] = {}
        errors = 0
        for label, fast in (("stock_asyncio", False), ("uvloop", True)):
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_ocsp_server, args=(str(folder), child, server_cpu, fast))
            proc.start()
            try:
                if not parent.poll(30):
                    raise RuntimeError("OCSP server did not start")
                port = parent.recv()
                if client_cpu is not None:
                    os.sched_setaffinity(0, {client_cpu})
                asyncio.run(_load(port, bodies, 1.0, 16))  # warm-up
                server = psutil.Process(proc.pid)
                cpu0 = server.cpu_times()
                t0 = time.perf_counter()
                ok, bad = asyncio.run(_load(port, bodies, seconds, 16))
                rates[label] = ok / (time.perf_counter() - t0)
                cpu1 = server.cpu_times()
                used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
                # Responses per CPU-second of the server: what one core sustains, whatever
                # else the machine runs meanwhile (the wall-clock rate is not).
                rates[label + "_per_cpu_s"] = ok / used if used > 0 else 0.0
                errors += bad
            finally:
                os.sched_setaffinity(0, set(cpus))
                proc.terminate()
                proc.join(10)
        registry.close()

        # Raw floor in this process: the pure responder, then cryptography alone.
        statuses = {c.serial_number: CertStatusInfo.good() for c in certs}
        responder = OcspResponder.by_issuer(ca.issuing)
        n = 3000
        t0 = time.perf_counter()
        for i in range(n):
            respond(
                bodies[i % len(bodies)],
                responder,
                lambda s: statuses.get(s, CertStatusInfo.unknown()),
                NOW,
            )
        respond_rate = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            cert = certs[i % len(certs)]
            (
                ocsp.OCSPResponseBuilder()
                .add_response(
                    cert,
                    ca.issuing.cert,
                    hashes.SHA1(),
                    ocsp.OCSPCertStatus.GOOD,
                    NOW,
                    NOW + timedelta(minutes=10),
                    None,
                    None,
                )
                .responder_id(ocsp.OCSPResponderEncoding.HASH, ca.issuing.cert)
                .sign(ca.issuing.key, hashes.SHA256())
                .public_bytes(serialization.Encoding.DER)
            )
        raw_rate = n / (time.perf_counter() - t0)
    return {
        "http_responses_per_s": rates["uvloop"],
        "http_responses_per_server_cpu_s": rates["uvloop_per_cpu_s"],
        "http_responses_per_s_stock_asyncio": rates["stock_asyncio"],
        "http_responses_per_server_cpu_s_stock_asyncio": rates["stock_asyncio_per_cpu_s"],
        "http_errors": errors,
        "http_connections": 16,
        "server_pinned_cpu": server_cpu,
        "respond_in_process_per_s": respond_rate,
        "raw_cryptography_build_sign_per_s": raw_rate,
        "key": "EC P-256",
    }


# ------------------------------------------------------------------------------- mosquitto


class _Live:
    """A paho device session that notes when the broker drops it."""

    def __init__(self, port: int, chain: Path, cert: Path, key: Path, client_id: str) -> None:
        self.up = threading.Event()
        self.dropped_at: float | None = None
        self.done = threading.Event()
        ctx = ssl.create_default_context(cafile=str(chain))
        ctx.check_hostname = False
        ctx.load_cert_chain(cert, key)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.tls_set_context(ctx)
        self.client.on_connect = lambda *a: self.up.set()
        self.client.on_disconnect = self._gone
        self.port = port

    def _gone(self, *_a: Any) -> None:
        if self.up.is_set() and self.dropped_at is None:
            self.dropped_at = time.perf_counter()
            self.done.set()

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self.up.wait(5):
            raise RuntimeError("device did not connect")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _refused(port: int, chain: Path, cert: Path, key: Path) -> bool:
    """One fresh mTLS handshake: True if mosquitto refuses the client certificate.

    TLS 1.2, so the server's verdict on the client certificate is part of the handshake; no
    MQTT CONNECT is sent, which would take over the device's live session (client id = CN).
    """
    ctx = ssl.create_default_context(cafile=str(chain))
    ctx.check_hostname = False
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with ctx.wrap_socket(raw):
                return False
    except (ssl.SSLError, OSError):
        return True


def bench_mosquitto(fleet_size: int, rounds: int) -> dict[str, Any]:
    if shutil.which("mosquitto") is None:
        return {"skipped": "mosquitto not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        home = folder / "home"
        make_home(home)
        loaded = load_home(home)
        phrase = loaded.layout.passphrase_file.read_bytes().strip()
        root_key = load_private_key_pem(loaded.layout.root_key.read_bytes(), phrase)
        server_key = load_private_key_pem(loaded.layout.server_key.read_bytes(), None)
        server_cert = x509.load_pem_x509_certificate(loaded.layout.server_cert.read_bytes())
        ca = MemoryCa(Issuer(loaded.root_cert, root_key), loaded.issuer, server_cert, server_key)
        registry = Registry.open(loaded.layout.registry)
        fleet = Fleet(ca, registry, folder)
        t0 = time.perf_counter()
        for i in range(fleet_size):
            fleet.enroll(f"old-{i}")
            registry.revoke_device(DeviceId(f"old-{i}"), reason="superseded", now=NOW, actor="b")
        setup_s = time.perf_counter() - t0
        publisher = CrlPublisher(registry, loaded.issuer)
        t0 = time.perf_counter()
        published = publisher.publish(datetime.now(UTC))
        rebuild_s = time.perf_counter() - t0

        port = free_port()
        out = folder / "mosquitto"
        args = ["mosquitto-config", "--home", str(home), "--out", str(out), "--port", str(port)]
        args += ["--bind", "127.0.0.1", "--admin-port", str(free_port())]
        if os.geteuid() == 0:
            args += ["--user", "root"]  # the temp folder is 0700 root
        mosquitto_app(args, standalone_mode=False)
        files = MosquittoFiles(out)
        log = (folder / "mosquitto.log").open("wb")
        proc = subprocess.Popen(["mosquitto", "-c", str(files.conf)], stdout=log, stderr=log)
        stop = threading.Event()
        drops: list[float] = []
        refusals: list[float] = []
        try:
            deadline = time.monotonic() + 10
            while not files.pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            sync = MosquittoSync(
                CrlPublisher(registry, loaded.issuer, since_seq=read_cursor(files)),
                files,
                lambda: read_pid(files.pidfile),
                open_control(files),
                lambda: datetime.now(UTC),
            )
            thread = threading.Thread(target=sync.run, args=(0.2, stop), daemon=True)
            thread.start()
            chain = fleet.chain_file()
            for r in range(rounds):
                device = f"victim-{r}"
                fleet.enroll(device)
                cert, key = fleet.cert_file(device), fleet.key_file(device)
                live = _Live(port, chain, cert, key, device)
                live.start()
                if _refused(port, chain, cert, key):
                    raise RuntimeError("a good device was refused")
                live.up.wait(1)
                t_revoke = time.perf_counter()
                registry.revoke_device(
                    DeviceId(device), reason="keyCompromise", now=datetime.now(UTC), actor="b"
                )
                refused_at = None
                while time.perf_counter() - t_revoke < 15:
                    if _refused(port, chain, cert, key):
                        refused_at = time.perf_counter()
                        break
                    time.sleep(0.01)
                live.done.wait(15)
                live.stop()
                if refused_at is None or live.dropped_at is None:
                    raise RuntimeError(f"round {r}: not refused or not dropped within 15 s")
                refusals.append(refused_at - t_revoke)
                drops.append(live.dropped_at - t_revoke)
        finally:
            stop.set()
            proc.terminate()
            proc.wait(10)
            log.close()
            registry.close()
    return {
        "fleet_revoked_entries": fleet_size,
        "fleet_setup_s": setup_s,
        "crl_rebuild_from_registry_s": rebuild_s,
        "crl_der_bytes": len(published.der),
        "sync_interval_s": 0.2,
        "rounds": rounds,
        "revoke_to_refusal_s": {"median": statistics.median(refusals), "max": max(refusals)},
        "revoke_to_live_drop_s": {"median": statistics.median(drops), "max": max(drops)},
        "mosquitto": subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True
        ).stdout.splitlines()[0],
    }


# ------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=int, default=10_000, help="revoked certs in registry")
    parser.add_argument("--ocsp-seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/revocation.json")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    ca = make_ca()
    crl = bench_crl(ca)
    ocsp_result = bench_ocsp(ca, args.ocsp_seconds)
    mosq = bench_mosquitto(args.fleet, args.rounds)

    rows = [
        ("CRL build+sign, 10k entries", f"{crl['build_10000']['median_s']:.3f} s", ""),
        ("CRL build+sign, 100k entries", f"{crl['build_100000']['median_s']:.3f} s", "<= 2 s"),
        ("  naive add_revoked_certificate, 10k", f"{crl['naive_add_revoked_10000_s']:.3f} s", ""),
        ("  naive add_revoked_certificate, 30k", f"{crl['naive_add_revoked_30000_s']:.3f} s", ""),
        (
            "OCSP over HTTP keep-alive, per server CPU-second (uvloop)",
            f"{ocsp_result['http_responses_per_server_cpu_s']:,.0f} /s",
            ">= 2,000/s",
        ),
        (
            "  same, wall clock (server pinned to 1 core)",
            f"{ocsp_result['http_responses_per_s']:,.0f} /s",
            "",
        ),
        (
            "  stock asyncio loop, per server CPU-second",
            f"{ocsp_result['http_responses_per_server_cpu_s_stock_asyncio']:,.0f} /s",
            "",
        ),
        ("  respond() in process", f"{ocsp_result['respond_in_process_per_s']:,.0f} /s", ""),
        (
            "  raw cryptography build+sign",
            f"{ocsp_result['raw_cryptography_build_sign_per_s']:,.0f} /s",
            "",
        ),
    ]
    if "skipped" not in mosq:
        rows += [
            (
                f"CRL rebuild from registry ({mosq['fleet_revoked_entries']:,} revoked)",
                f"{mosq['crl_rebuild_from_registry_s']:.3f} s",
                "< 1 s",
            ),
            (
                "mosquitto revoke -> refusal (median/max)",
                f"{mosq['revoke_to_refusal_s']['median']:.2f} / "
                f"{mosq['revoke_to_refusal_s']['max']:.2f} s",
                "<= 5 s",
            ),
            (
                "mosquitto revoke -> live drop (median/max)",
                f"{mosq['revoke_to_live_drop_s']['median']:.2f} / "
                f"{mosq['revoke_to_live_drop_s']['max']:.2f} s",
                "",
            ),
        ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'result':>16}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>16}  {target}")
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # Other work on the machine skews every number: recorded so runs can be compared.
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
        },
        "crl": crl,
        "ocsp": ocsp_result,
        "mosquitto": mosq,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
