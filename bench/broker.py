"""Benchmark: the embedded mTLS broker next to mosquitto 2.0, measured in the same run.

    .venv/bin/python bench/broker.py [--connections 10000] [--connects 400] [--revocations 200]
                                     [--messages 20000] [--stock-connections 2000]
                                     [--json bench/results/broker.json] [--md BENCHMARKS.md]

Each broker runs in its own process pinned to CPU 0; the load generator (this process, raw
asyncio TLS + hand-written MQTT 3.1.1 packets) is pinned to CPU 1. Same CA, same EC P-256
certificates, same TLS 1.3 for every broker. mosquitto is Debian's 2.0 package, started here
with require_certificate and set_tcp_nodelay true.

(a) broker CPU (user+sys, from /proc via psutil) per fresh mTLS connect: full handshake,
    CONNECT, CONNACK, DISCONNECT; --rounds interleaved rounds, lowest kept (CPU time is only
    ever inflated by other load on the machine). Target: <= 1.5 x mosquitto.
(b) RSS per idle mTLS connection with --connections admitted sessions (keepalive 600 s).
    Target: <= 64 KB. Stock amqtt 0.12.1 (anonymous auth, its own TLS listener) is measured
    at --stock-connections for reference.
(c) revocation-to-disconnect latency with --connections connected: a device is revoked in the
    registry from this process (another SQLite connection, as the CLI would) and the time to
    the client seeing its connection closed is recorded. Target: p99 <= 1 s. mosquitto has no
    such mechanism (it keeps revoked clients connected even after a CRL reload).
(d) QoS 0 and QoS 1 messages/s from one device to one subscribed service, with the topic
    policy and without it (BrokerConfig.policy_enabled=False), --rounds interleaved rounds on
    fresh brokers. The overhead is read from the broker's CPU per message (lowest of the
    rounds): on a shared 2-core machine the rates swing by +-15% between identical runs, the
    CPU time much less. Target: overhead <= 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402

from enroll_server.pki.ca import (  # noqa: E402
    Issuer,
    PkiUrls,
    build_issuing_ca,
    build_root_ca,
    build_server_certificate,
    server_hostnames,
)
from enroll_server.pki.keys import KeyType, generate_key, private_key_pem  # noqa: E402
from enroll_server.pki.profile import (  # noqa: E402
    DeviceProfile,
    build_device_certificate,
)
from enroll_server.registry import IssuedCertificate, NewDevice, Registry  # noqa: E402
from fleetpki.identity import DeviceId  # noqa: E402
from fleetpki.topics import Role  # noqa: E402

HOST = "127.0.0.1"
BROKER_CPU = 0
LOAD_CPU = 1


# ------------------------------------------------------------------ fleet on disk


@dataclass
class Fleet:
    root: Path
    chain: Path
    server_cert: Path
    server_key: Path
    registry: Path
    devices: list[tuple[str, Path, Path]]  # id, cert, key
    service: tuple[str, Path, Path]


def _pem(cert: Any) -> bytes:
    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def build_fleet(root: Path, n: int) -> Fleet:
    """Our CA, a server certificate, n devices and one service identity, all registered."""
    now = datetime.now(UTC)
    root_key = generate_key(KeyType.EC_P256)
    root_cert = build_root_ca(root_key, "bench root", now)
    issuing_key = generate_key(KeyType.EC_P256)
    issuing_cert = build_issuing_ca(issuing_key, Issuer(root_cert, root_key), "bench issuing", now)
    urls = PkiUrls("http://127.0.0.1/crl", "http://127.0.0.1/ocsp", "http://127.0.0.1/ca")
    issuer = Issuer(issuing_cert, issuing_key, urls)
    server_key = generate_key(KeyType.EC_P256)
    server_cert = build_server_certificate(
        server_key.public_key(), issuer, server_hostnames([]), now
    )
    chain = root / "chain.pem"
    chain.write_bytes(_pem(issuing_cert) + _pem(root_cert))
    (root / "server.pem").write_bytes(_pem(server_cert) + _pem(issuing_cert))
    (root / "server.key").write_bytes(private_key_pem(server_key, None))
    os.chmod(root / "server.key", 0o600)
    registry = Registry.open(root / "registry.db")
    # One key for every device: key generation is not what is measured, certificates differ.
    device_key = generate_key(KeyType.EC_P256)
    key_path = root / "device.key"
    key_path.write_bytes(private_key_pem(device_key, None))
    ids = [f"dev{i:05d}" for i in range(n)]
    registry.create_batch(
        "bench",
        [NewDevice(DeviceId(i)) for i in ids],
        kind="token",
        token_ttl=timedelta(days=1),
        now=now,
        actor="bench",
    )
    certs_dir = root / "certs"
    certs_dir.mkdir()
    profile = DeviceProfile(validity=timedelta(days=2))

    def issue(name: str, role: Role) -> Path:
        did = DeviceId(name)
        cert = build_device_certificate(device_key.public_key(), did, issuer, now, profile, role)
        path = certs_dir / f"{name}.pem"
        path.write_bytes(_pem(cert))
        registry.record_issuance(
            IssuedCertificate(
                serial=cert.serial_number,
                device_id=did,
                fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                pem=_pem(cert).decode(),
            ),
            consume_token_hash=None,
            supersedes_serial=None,
            now=now,
            actor="bench",
        )
        return path

    devices = [(i, issue(i, Role.DEVICE), key_path) for i in ids]
    registry.add_device(DeviceId("backend"), role="service", now=now, actor="bench")
    service = ("backend", issue("backend", Role.SERVICE), key_path)
    registry.close()
    return Fleet(
        root,
        chain,
        root / "server.pem",
        root / "server.key",
        root / "registry.db",
        devices,
        service,
    )


# ------------------------------------------------------------------ brokers under test

_OURS = r"""
import asyncio, json, logging, os, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["root"])
os.sched_setaffinity(0, {spec["cpu"]})
logging.basicConfig(level=logging.WARNING)
from enroll_server.broker import BrokerConfig, KeepalivePolicy, start_broker
from enroll_server.transport.loop import install_fast_loop
install_fast_loop()  # the event loop `fleetpki serve` and `fleetpki broker` run on
async def main():
    cfg = BrokerConfig(
        server_cert=Path(spec["cert"]), server_key=Path(spec["key"]), ca_file=Path(spec["ca"]),
        registry_path=Path(spec["registry"]), host="127.0.0.1", port=0,
        max_connections=spec["max"], connect_timeout=60, handshake_timeout=60,
        policy_enabled=spec["policy"], keepalive=KeepalivePolicy(max_seconds=3600),
    )
    running = await start_broker(cfg)
    print(running.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await running.stop()
asyncio.run(main())
"""

_STOCK = r"""
import asyncio, json, logging, os, sys
spec = json.loads(sys.argv[1])
os.sched_setaffinity(0, {spec["cpu"]})
logging.basicConfig(level=logging.WARNING)
from amqtt.broker import Broker
async def main():
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0", "ssl": True,
                                  "cafile": spec["ca"], "certfile": spec["cert"],
                                  "keyfile": spec["key"], "max_connections": spec["max"]}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    print(broker._servers["default"].instance.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await broker.shutdown()
asyncio.run(main())
"""


class BrokerProcess:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.ps = psutil.Process(proc.pid)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _spawn_python(name: str, script: str, spec: dict[str, Any]) -> BrokerProcess:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{name} broker did not start")
    return BrokerProcess(name, proc, int(line))


def start_ours(fleet: Fleet, policy: bool = True, max_connections: int = 20_000) -> BrokerProcess:
    spec = {
        "root": str(ROOT),
        "cpu": BROKER_CPU,
        "cert": str(fleet.server_cert),
        "key": str(fleet.server_key),
        "ca": str(fleet.chain),
        "registry": str(fleet.registry),
        "max": max_connections,
        "policy": policy,
    }
    return _spawn_python("fleetpki" if policy else "fleetpki (no policy)", _OURS, spec)


def start_stock(fleet: Fleet, max_connections: int = 20_000) -> BrokerProcess:
    spec = {
        "cpu": BROKER_CPU,
        "cert": str(fleet.server_cert),
        "key": str(fleet.server_key),
        "ca": str(fleet.chain),
        "max": max_connections,
    }
    return _spawn_python("stock amqtt 0.12.1", _STOCK, spec)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def start_mosquitto(fleet: Fleet) -> BrokerProcess:
    port = _free_port()
    conf = fleet.root / "mosquitto.conf"
    conf.write_text(
        f"""per_listener_settings false
listener {port} {HOST}
cafile {fleet.chain}
certfile {fleet.server_cert}
keyfile {fleet.server_key}
require_certificate true
use_identity_as_username true
set_tcp_nodelay true
allow_anonymous false
max_keepalive 3600
persistence false
log_dest none
user root
"""
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdin=subprocess.PIPE)
    psutil.Process(proc.pid).cpu_affinity([BROKER_CPU])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("mosquitto did not start")
    b = BrokerProcess("mosquitto 2.0", proc, port)
    b.stop = lambda: (proc.terminate(), proc.wait(timeout=10))  # type: ignore[method-assign]
    return b


# ------------------------------------------------------------------ a lean MQTT 3.1.1 client


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _fixed(first: int, body: bytes) -> bytes:
    n = len(body)
    out = bytearray([first])
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + body


def connect_packet(cid: str, keepalive: int = 600) -> bytes:
    return _fixed(
        0x10, _s(b"MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big") + _s(cid.encode())
    )


def publish_packet(topic: str, payload: bytes, qos: int, pid: int = 0) -> bytes:
    var = _s(topic.encode()) + (pid.to_bytes(2, "big") if qos else b"")
    return _fixed(0x30 | (qos << 1), var + payload)


def subscribe_packet(pid: int, topic_filter: str, qos: int) -> bytes:
    return _fixed(0x82, pid.to_bytes(2, "big") + _s(topic_filter.encode()) + bytes([qos]))


DISCONNECT = b"\xe0\x00"


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    n, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await reader.readexactly(n)


class Contexts:
    """One client SSLContext per identity, built on demand (loading a chain costs ~0.3 ms)."""

    def __init__(self, ca: Path) -> None:
        self.ca = ca

    def make(self, cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx


async def mqtt_connect(
    port: int, ctx: ssl.SSLContext, cid: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST)
    writer.write(connect_packet(cid))
    first, body = await read_packet(reader)
    if first != 0x20 or body[1] != 0:
        raise RuntimeError(f"{cid}: CONNACK {body!r}")
    return reader, writer


async def gather_limited(n: int, limit: int, job: Callable[[int], Awaitable[Any]]) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> Any:
        async with sem:
            return await job(i)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


# ------------------------------------------------------------------ (a) CPU per connect


async def bench_connect_cpu(broker: BrokerProcess, fleet: Fleet, n: int) -> dict[str, Any]:
    ctxs = Contexts(fleet.chain)
    pool = fleet.devices[:n]
    contexts = [ctxs.make(c, k) for _, c, k in pool]

    async def once(i: int) -> None:
        _, writer = await mqtt_connect(broker.port, contexts[i], pool[i][0])
        writer.write(DISCONNECT)
        await writer.drain()
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass

    await gather_limited(min(50, n), 4, once)  # warm-up
    await asyncio.sleep(0.5)
    cpu0, t0 = broker.cpu(), time.perf_counter()
    await gather_limited(n, 4, once)
    await asyncio.sleep(0.3)  # let the broker finish closing
    cpu = broker.cpu() - cpu0
    wall = time.perf_counter() - t0
    return {"connects": n, "cpu_ms_per_connect": cpu * 1000 / n, "connects_per_s": n / wall}


# ------------------------------------------------------------------ (b) memory per idle session


async def open_idle(
    broker: BrokerProcess, fleet: Fleet, n: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    ctxs = Contexts(fleet.chain)

    async def one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        cid, cert, key = fleet.devices[i]
        return await mqtt_connect(broker.port, ctxs.make(cert, key), cid)

    return await gather_limited(n, 32, one)


async def bench_idle_memory(
    broker: BrokerProcess, fleet: Fleet, n: int
) -> tuple[dict[str, Any], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    warm = await open_idle(broker, fleet, 20)
    for _, w in warm:
        w.write(DISCONNECT)
        w.close()
    await asyncio.sleep(1.0)
    rss0 = broker.rss()
    t0 = time.perf_counter()
    conns = await open_idle(broker, fleet, n)
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(2.0)
    rss1 = broker.rss()
    return {
        "connections": n,
        "rss_before_mb": rss0 / 2**20,
        "rss_after_mb": rss1 / 2**20,
        "kb_per_connection": (rss1 - rss0) / n / 1000,
        "connect_all_s": elapsed,
    }, conns


# ------------------------------------------------------------------ (c) revocation latency


async def bench_revocation(
    fleet: Fleet,
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    rounds: int,
) -> dict[str, Any]:
    registry = Registry.open(fleet.registry)
    latencies: list[float] = []
    now = datetime.now(UTC)
    step = max(1, len(conns) // rounds)
    for r in range(rounds):
        i = (r * step) % len(conns)
        reader, _ = conns[i]
        cid = fleet.devices[i][0]
        closed = asyncio.ensure_future(reader.read(1))
        await asyncio.to_thread(
            registry.revoke_device, DeviceId(cid), reason="keyCompromise", now=now, actor="bench"
        )
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(5):
                await closed
            latencies.append(time.perf_counter() - t0)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            latencies.append(float("inf") if not closed.done() else time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    registry.close()
    finite = sorted(latencies)
    return {
        "connected": len(conns),
        "revocations": rounds,
        "p50_ms": statistics.median(finite) * 1000,
        "p99_ms": finite[min(len(finite) - 1, int(len(finite) * 0.99))] * 1000,
        "max_ms": finite[-1] * 1000,
    }


# ------------------------------------------------------------------ (d) throughput


async def bench_throughput(
    broker: BrokerProcess, fleet: Fleet, qos: int, messages: int
) -> dict[str, Any]:
    ctxs = Contexts(fleet.chain)
    sid, scert, skey = fleet.service
    sub_r, sub_w = await mqtt_connect(broker.port, ctxs.make(scert, skey), sid)
    sub_w.write(subscribe_packet(1, "devices/+/telemetry", qos))
    first, body = await read_packet(sub_r)
    if first != 0x90 or body[2] != qos:
        raise RuntimeError(f"subscription refused: {body!r}")
    pid_, pcert, pkey = fleet.devices[-1]
    pub_r, pub_w = await mqtt_connect(broker.port, ctxs.make(pcert, pkey), pid_)
    topic = f"devices/{pid_}/telemetry"
    payload = b'{"t": 21.5, "seq": 000000}'
    received = 0
    done = asyncio.Event()

    async def subscriber() -> None:
        nonlocal received
        while received < messages:
            first, body = await read_packet(sub_r)
            if first >> 4 == 3:
                received += 1
                if (first >> 1) & 3:
                    tlen = int.from_bytes(body[:2], "big")
                    sub_w.write(b"\x40\x02" + body[2 + tlen : 4 + tlen])  # PUBACK
        done.set()

    window = asyncio.Semaphore(20)

    async def acks() -> None:
        while True:
            first, _ = await read_packet(pub_r)
            if first >> 4 == 4:
                window.release()

    sub_task = asyncio.ensure_future(subscriber())
    ack_task = asyncio.ensure_future(acks()) if qos else None
    t0 = time.perf_counter()
    cpu0 = broker.cpu()
    for i in range(messages):
        if qos:
            await window.acquire()
            pub_w.write(publish_packet(topic, payload, 1, (i % 65535) + 1))
        else:
            pub_w.write(publish_packet(topic, payload, 0))
        if i % 64 == 0:
            await pub_w.drain()
    await pub_w.drain()
    try:
        async with asyncio.timeout(300):
            await done.wait()
    finally:
        elapsed = time.perf_counter() - t0
        cpu = broker.cpu() - cpu0
        sub_task.cancel()
        if ack_task:
            ack_task.cancel()
        for w in (pub_w, sub_w):
            w.write(DISCONNECT)
            w.close()
    return {
        "qos": qos,
        "messages": messages,
        "received": received,
        "msgs_per_s": received / elapsed,
        "broker_cpu_us_per_msg": cpu * 1e6 / max(received, 1),
    }


# ------------------------------------------------------------------ report


def _md(result: dict[str, Any]) -> str:
    a = result["connect_cpu"]
    b = result["idle_memory"]
    c = result["revocation"]
    d = result["throughput"]
    m, o = a["mosquitto 2.0"], a["fleetpki"]
    lines = [
        "## Embedded broker (bench/broker.py)",
        "",
        f"Run {result['date']} on {result['machine']}; each broker pinned to one core, the "
        "load generator to the other; EC P-256 certificates, TLS 1.3. "
        "Re-run: `.venv/bin/python bench/broker.py`.",
        "",
        "| figure | fleetpki broker | mosquitto 2.0 | target |",
        "|---|---|---|---|",
        f"| (a) broker CPU per fresh mTLS connect (lowest of {o['rounds']}; median) | "
        f"{o['cpu_ms_per_connect']:.2f} ms ({o['cpu_ms_per_connect'] / m['cpu_ms_per_connect']:.2f}"
        f" x); {o['median_cpu_ms_per_connect']:.2f} ms | {m['cpu_ms_per_connect']:.2f} ms; "
        f"{m['median_cpu_ms_per_connect']:.2f} ms | <= 1.5 x mosquitto |",
    ]
    bo, bm = b["fleetpki"], b["mosquitto 2.0"]
    stock = b.get("stock amqtt 0.12.1")
    stock_txt = (
        f" (stock amqtt 0.12.1: {stock['kb_per_connection']:.0f} KB at {stock['connections']})"
        if stock
        else ""
    )
    lines.append(
        f"| (b) RSS per idle mTLS session at {bo['connections']:,} | "
        f"{bo['kb_per_connection']:.1f} KB{stock_txt} | {bm['kb_per_connection']:.1f} KB | "
        "<= 64 KB |"
    )
    lines.append(
        f"| (c) revocation to disconnect, {c['connected']:,} connected, {c['revocations']} "
        f"revocations | p50 {c['p50_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms | "
        "not supported (keeps revoked sessions) | p99 <= 1 s |"
    )
    for qos in (0, 1):
        with_p = d[f"fleetpki qos{qos}"]
        without = d[f"fleetpki (no policy) qos{qos}"]
        mos = d[f"mosquitto 2.0 qos{qos}"]
        overhead = 100 * (1 - with_p["msgs_per_s"] / without["msgs_per_s"])
        cpu_on = with_p["min_broker_cpu_us_per_msg"]
        cpu_off = without["min_broker_cpu_us_per_msg"]
        lines.append(
            f"| (d) QoS {qos} msgs/s, policy on / off (best of {with_p['rounds']}) | "
            f"{with_p['msgs_per_s']:,.0f} / {without['msgs_per_s']:,.0f}; overhead "
            f"{100 * (cpu_on / cpu_off - 1):.1f}% by broker CPU per message ({cpu_on:.0f} / "
            f"{cpu_off:.0f} us, lowest), {overhead:.1f}% by best rate | "
            f"{mos['msgs_per_s']:,.0f} | overhead <= 10% |"
        )
    lines += [
        "",
        "Notes. (a) CPU time on this shared 2-core machine is only ever inflated by other load, "
        "so each broker's lowest round is its figure (medians alongside); the TLS handshake "
        "itself (OpenSSL, same for both) is most of it, the rest is amqtt's per-connection "
        "Python. (b) Stock amqtt holds a 256 KiB asyncio TLS read buffer, a `transitions` "
        "state machine and four asyncio queues per connection; the hardened broker shares one "
        "read buffer per loop, issues no TLS tickets and replaces the rest (see "
        "enroll_server/broker/hardening/). (c) The broker polls the registry's event log every "
        "200 ms; revocations were written from another SQLite connection, as the CLI does. "
        "(d) One device publishing to one subscribed service; rates swing by +-15% between "
        "identical runs here, so the policy overhead is read from the broker's CPU per "
        "message. Raw numbers: bench/results/broker.json.",
        "",
    ]
    return "\n".join(lines)


def write_md(path: Path, section: str) -> None:
    start, end = "<!-- bench/broker.py:start -->", "<!-- bench/broker.py:end -->"
    block = f"{start}\n{section}{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


async def run(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {_mosquitto_version()}",
        "connect_cpu": {},
        "idle_memory": {},
        "throughput": {},
    }
    # (a) interleaved rounds on fresh brokers. CPU time is inflated by whatever else shares
    # the machine (caches, frequency), never deflated: each broker keeps its lowest figure.
    connects: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        # Alternate the order: whatever drifts during a round must not favour one broker.
        for start in (start_mosquitto, start_ours)[:: 1 if rnd % 2 == 0 else -1]:
            broker = start(fleet)
            try:
                print(f"[a] {broker.name}: {args.connects} connects", flush=True)
                connects.setdefault(broker.name, []).append(
                    await bench_connect_cpu(broker, fleet, args.connects)
                )
            finally:
                broker.stop()
    for name, rs in connects.items():
        best = min(rs, key=lambda r: r["cpu_ms_per_connect"])
        result["connect_cpu"][name] = {
            **best,
            "rounds": len(rs),
            "all_cpu_ms_per_connect": [round(r["cpu_ms_per_connect"], 3) for r in rs],
            "median_cpu_ms_per_connect": statistics.median(r["cpu_ms_per_connect"] for r in rs),
        }
    # (d) interleaved rounds, fresh broker each time: this machine's other load comes and
    # goes, so each configuration keeps its best rate (and the median broker CPU/message).
    runs: dict[str, list[dict[str, Any]]] = {}
    starters: list[Callable[[Fleet], BrokerProcess]] = [
        lambda f: start_ours(f, policy=True),
        lambda f: start_ours(f, policy=False),
        start_mosquitto,
    ]
    for rnd in range(args.rounds):
        for starter in starters[:: 1 if rnd % 2 == 0 else -1]:
            for qos in (0, 1):
                broker = starter(fleet)
                try:
                    print(f"[d] {broker.name}: QoS {qos}, {args.messages} messages", flush=True)
                    runs.setdefault(f"{broker.name} qos{qos}", []).append(
                        await bench_throughput(broker, fleet, qos, args.messages)
                    )
                finally:
                    broker.stop()
    for key, rs in runs.items():
        best = max(rs, key=lambda r: r["msgs_per_s"])
        result["throughput"][key] = {
            **best,
            "rounds": len(rs),
            "all_msgs_per_s": [round(r["msgs_per_s"]) for r in rs],
            "median_broker_cpu_us_per_msg": statistics.median(
                r["broker_cpu_us_per_msg"] for r in rs
            ),
            "min_broker_cpu_us_per_msg": min(r["broker_cpu_us_per_msg"] for r in rs),
        }
    # (b) then (c) on the same 10k sessions.
    for start in (start_mosquitto, start_ours):
        broker = start(fleet)
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            print(f"[b] {broker.name}: {args.connections} idle sessions", flush=True)
            result["idle_memory"][broker.name], conns = await bench_idle_memory(
                broker, fleet, args.connections
            )
            if broker.name == "fleetpki":
                print(f"[c] {args.revocations} revocations", flush=True)
                result["revocation"] = await bench_revocation(fleet, conns, args.revocations)
        finally:
            for _, w in conns:
                w.transport.abort()
            broker.stop()
    if args.stock_connections:
        broker = start_stock(fleet)
        conns = []
        try:
            print(f"[b] {broker.name}: {args.stock_connections} idle sessions", flush=True)
            result["idle_memory"][broker.name], conns = await bench_idle_memory(
                broker, fleet, args.stock_connections
            )
        finally:
            for _, w in conns:
                w.transport.abort()
            broker.stop()
    return result


def _mosquitto_version() -> str:
    out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()[0:1]
    return first[0].strip() if first else "mosquitto"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--connects", type=int, default=400)
    ap.add_argument("--revocations", type=int, default=200)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds of (a) and (d)")
    ap.add_argument("--stock-connections", type=int, default=2_000)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "broker.json")
    ap.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary fleet folder")
    ap.add_argument("--render", type=Path, help="only re-render --md from this result JSON")
    args = ap.parse_args()
    if args.render:
        write_md(args.md, _md(json.loads(args.render.read_text())))
        return
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto is not installed (Debian: apt-get install mosquitto)")
    if args.connects > args.connections:
        sys.exit("--connects must not exceed --connections")
    os.sched_setaffinity(0, {LOAD_CPU})
    tmp = Path(tempfile.mkdtemp(prefix="fleetpki-bench-broker-"))
    try:
        print(f"building a fleet of {args.connections + 2} identities in {tmp}", flush=True)
        fleet = build_fleet(tmp, args.connections + 1)
        result = asyncio.run(run(args, fleet))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    section = _md(result)
    print()
    print(section)
    if args.md:
        write_md(args.md, section)


if __name__ == "__main__":
    main()
