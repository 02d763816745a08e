"""Benchmark: the embedded mTLS broker, mosquitto 2.0 and RabbitMQ 3.10, measured in one run.

    .venv/bin/python bench/broker.py [--connections 10000] [--drop-connections 2000]
                                     [--connects 400] [--revocations 200] [--messages 20000]
                                     [--allow-batch 10000] [--rounds 4]
                                     [--stock-connections 2000] [--rabbitmq-connections N]
                                     [--brokers embedded,mosquitto,rabbitmq]
                                     [--json bench/results/broker.json] [--md BENCHMARKS.md]

One fleetpki home (`fleetpki init`) holds the CA, the server certificate and the registry that
every broker uses: the same EC P-256 certificates, TLS 1.3 everywhere. Each broker runs as its
own process(es) pinned to CPU 0 together with whatever fleetpki runs next to it; the load
generator (this process, raw asyncio TLS + hand-written MQTT 3.1.1 packets) is pinned to CPU 1.

- fleetpki: the embedded broker (`fleetpki broker`), reading the registry itself.
- mosquitto 2.0 (Debian): started from `fleetpki broker mosquitto-config`, with
  `fleetpki broker mosquitto-sync` (CRL + dynamic-security kicks) running next to it.
- RabbitMQ 3.10 (Debian): one node started from `fleetpki broker rabbitmq-config` through the
  test harness (tests/rabbitmq_node.py), authorisation answered by a `fleetpki serve
  --no-broker` process (HTTP auth backend behind RabbitMQ's cache), with `fleetpki broker
  rabbitmq-sync` (CRL + management API kicks) running next to it. Its CPU and RSS are the
  Erlang VM's (beam.smp); the auth server's CPU is reported beside it.

(a) broker CPU (user+sys, from /proc via psutil) per fresh mTLS connect: full handshake,
    CONNECT, CONNACK, DISCONNECT; --rounds interleaved rounds, lowest kept (CPU time is only
    ever inflated by other load on the machine). Target: embedded <= 1.5 x mosquitto.
(b) RSS per idle mTLS connection with --connections admitted sessions (keepalive 600 s;
    RabbitMQ: --rabbitmq-connections, default the same; it holds 0.3-1.2 MB per session).
    Target: embedded <= 64 KB. Stock amqtt 0.12.1 (anonymous auth, its own TLS listener) is
    measured at --stock-connections for reference.
(c) revocation-to-disconnect latency with --drop-connections of those sessions still
    connected: a device is revoked in the registry from this process (another SQLite
    connection, as the CLI would) and the time to the client seeing its connection closed is
    recorded. The embedded broker polls the registry itself; mosquitto and RabbitMQ are told
    by their syncer (0.2 s polls). Target: p99 <= 1 s.
(d) QoS 0 and QoS 1 messages/s from one device to one subscribed service (the embedded broker
    also without its topic policy, BrokerConfig.policy_enabled=False), --rounds interleaved
    rounds on fresh brokers. The policy overhead is read from the broker's CPU per message
    (lowest of the rounds): on a shared 2-core machine the rates swing by +-15% between
    identical runs, the CPU time much less. Target: overhead <= 10%.
(e) a fleet of --allow-batch devices becoming allowed: with the broker (and its syncer)
    running, a new factory batch is created and every device's certificate recorded in the
    registry (one group commit, as enrollment does; its time is reported), then the last
    device of the batch connects: the figure is the time from the commit to its CONNACK 0.
    No broker keeps a per-device copy (the embedded broker and RabbitMQ's auth backend ask
    the registry, mosquitto needs only the CA and a pattern ACL), so nothing has to be
    provisioned. Reconcile: the syncers' cursor is set back to 0 and one `--once` round is
    timed (a process start, every registry event of the fleet, the CRL, one kick per
    revoked device): what a syncer that lost its cursor does before it is current.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402

from enroll_server.broker.mosquitto_config import MosquittoFiles  # noqa: E402
from enroll_server.broker.rabbitmq_config import RabbitFiles  # noqa: E402
from enroll_server.home.layout import load_home  # noqa: E402
from enroll_server.pki.ca import Issuer  # noqa: E402
from enroll_server.pki.keys import KeyType, generate_key, private_key_pem  # noqa: E402
from enroll_server.pki.profile import (  # noqa: E402
    DeviceProfile,
    build_device_certificate,
)
from enroll_server.registry import Issuance, IssuedCertificate, NewDevice, Registry  # noqa: E402
from fleetpki.identity import DeviceId  # noqa: E402
from fleetpki.topics import Role  # noqa: E402
from tests.integration.test_revocation_mosquitto import _config as mosquitto_config  # noqa: E402
from tests.live_server import make_home  # noqa: E402
from tests.rabbitmq_node import SERVER as RABBITMQ_SERVER  # noqa: E402
from tests.rabbitmq_node import RabbitNode, stop_epmd  # noqa: E402
from tests.rabbitmq_node import configure as rabbitmq_config  # noqa: E402

HOST = "127.0.0.1"
BROKER_CPU = 0
LOAD_CPU = 1
CONNECT_TIMEOUT = 120.0
EMBEDDED, MOSQUITTO, RABBITMQ = "fleetpki", "mosquitto 2.0", "RabbitMQ 3.10"
BROKERS = {"embedded": EMBEDDED, "mosquitto": MOSQUITTO, "rabbitmq": RABBITMQ}


# ------------------------------------------------------------------ fleet on disk

Device = tuple[str, Path, Path]  # id, cert, key


@dataclass
class Fleet:
    root: Path
    home: Path
    chain: Path
    server_cert: Path
    server_key: Path
    registry: Path
    devices: list[Device]
    service: Device
    # (e): per broker, certificates issued but not yet recorded in the registry
    pending: dict[str, tuple[list[Device], list[IssuedCertificate]]] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)

    def live(self) -> list[Device]:
        return [d for d in self.devices if d[0] not in self.revoked]


def _pem(cert: Any) -> bytes:
    return bytes(cert.public_bytes(serialization.Encoding.PEM))


class _Minter:
    """Device certificates from the home's issuing CA, one key for all (key generation is not
    what is measured; the certificates differ)."""

    def __init__(self, root: Path, issuer: Issuer, now: datetime) -> None:
        self.issuer = issuer
        self.now = now
        self.key = generate_key(KeyType.EC_P256)
        self.key_path = root / "device.key"
        self.key_path.write_bytes(private_key_pem(self.key, None))
        self.key_path.chmod(0o600)
        self.certs = root / "certs"
        self.certs.mkdir()
        self.profile = DeviceProfile(validity=timedelta(days=2))

    def issue(self, name: str, role: Role = Role.DEVICE) -> tuple[Device, IssuedCertificate]:
        did = DeviceId(name)
        cert = build_device_certificate(
            self.key.public_key(), did, self.issuer, self.now, self.profile, role
        )
        path = self.certs / f"{name}.pem"
        path.write_bytes(_pem(cert))
        record = IssuedCertificate(
            serial=cert.serial_number,
            device_id=did,
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            pem=_pem(cert).decode(),
        )
        return (name, path, self.key_path), record


def register(registry: Registry, batch: str, records: list[IssuedCertificate]) -> None:
    """A factory batch of these devices, then their certificates in one group commit."""
    now = datetime.now(UTC)
    registry.create_batch(
        batch,
        [NewDevice(r.device_id) for r in records],
        kind="token",
        token_ttl=timedelta(days=1),
        now=now,
        actor="bench",
    )
    refused = registry.record_issuances([Issuance(r, None, None, now, "bench") for r in records])
    assert not any(refused), [r for r in refused if r]


def build_fleet(root: Path, n: int, allow_batches: dict[str, int]) -> Fleet:
    """A fleetpki home (CA, server certificate, registry), n registered devices, one service,
    and for each of `allow_batches` that many certificates issued but not yet registered."""
    layout = make_home(root / "home")
    loaded = load_home(layout.root)
    chain = root / "chain.pem"
    chain.write_bytes(_pem(loaded.issuer.cert) + _pem(loaded.root_cert))
    minter = _Minter(root, loaded.issuer, datetime.now(UTC))
    registry = Registry.open(loaded.registry)
    issued = [minter.issue(f"dev{i:05d}") for i in range(n)]
    register(registry, "bench", [r for _, r in issued])
    service, record = minter.issue("backend", Role.SERVICE)
    registry.add_device(DeviceId("backend"), role="service", now=minter.now, actor="bench")
    refused = registry.record_issuances([Issuance(record, None, None, minter.now, "bench")])
    assert not any(refused)
    registry.close()
    fleet = Fleet(
        root,
        layout.root,
        chain,
        layout.server_cert,
        layout.server_key,
        Path(str(loaded.registry.path)),  # type: ignore[union-attr]
        [d for d, _ in issued],
        service,
    )
    for prefix, count in allow_batches.items():
        batch = [minter.issue(f"{prefix}{i:05d}") for i in range(count)]
        fleet.pending[prefix] = ([d for d, _ in batch], [r for _, r in batch])
    return fleet


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

# `fleetpki serve --no-broker` with every listener on an ephemeral port: RabbitMQ's HTTP auth
# backend asks its admin listener.
_AUTH = r"""
import asyncio, json, logging, os, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["root"])
os.sched_setaffinity(0, {spec["cpu"]})
logging.basicConfig(level=logging.WARNING)
from enroll_server.transport.loop import install_fast_loop
from enroll_server.wiring.server import start_server
install_fast_loop()
async def main():
    handle = await start_server(
        Path(spec["home"]), est_port=0, http_port=0, mqtt_port=0, admin_port=0, broker=False
    )
    print(handle.admin_port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await handle.stop()
asyncio.run(main())
"""

_FLEETPKI = "import sys; from enroll_server.cli import main; sys.exit(main())"


@contextlib.contextmanager
def on_broker_cpu() -> Iterator[None]:
    """Processes started inside inherit the broker's CPU (all their threads, beam.smp's too)."""
    os.sched_setaffinity(0, {BROKER_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, {LOAD_CPU})


def _end(proc: subprocess.Popen[bytes], how: str = "stdin") -> None:
    """Ask a child to end (close its stdin, or SIGTERM) and wait; SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    if how == "stdin" and proc.stdin is not None:
        proc.stdin.close()
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class BrokerProcess:
    def __init__(
        self,
        name: str,
        pid: int,
        port: int,
        stop: Callable[[], None],
        side: psutil.Process | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.ps = psutil.Process(pid)
        self.side = side  # a fleetpki process that works per connect (RabbitMQ's auth backend)
        self._stop = stop
        self.syncer: SyncerProcess | None = None
        self.boot_s: float | None = None
        # where the broker says its memory goes (RabbitMQ: `rabbitmqctl status`), MB by use
        self.memory_breakdown: Callable[[], dict[str, float]] | None = None

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def side_cpu(self) -> float:
        if self.side is None:
            return 0.0
        t = self.side.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        if self.syncer is not None:
            self.syncer.stop()
        self._stop()


def _spawn_python(script: str, spec: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int]:
    with on_broker_cpu():
        proc = subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{script.splitlines()[1]}...: did not start")
    return proc, int(line)


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
    proc, port = _spawn_python(_OURS, spec)
    name = EMBEDDED if policy else f"{EMBEDDED} (no policy)"
    return BrokerProcess(name, proc.pid, port, lambda: _end(proc))


def start_stock(fleet: Fleet, max_connections: int = 20_000) -> BrokerProcess:
    spec = {
        "cpu": BROKER_CPU,
        "cert": str(fleet.server_cert),
        "key": str(fleet.server_key),
        "ca": str(fleet.chain),
        "max": max_connections,
    }
    proc, port = _spawn_python(_STOCK, spec)
    return BrokerProcess("stock amqtt 0.12.1", proc.pid, port, lambda: _end(proc))


def start_auth_server(fleet: Fleet) -> tuple[subprocess.Popen[bytes], int]:
    """`fleetpki serve --no-broker` on the broker's CPU; returns it and its admin port."""
    spec = {"root": str(ROOT), "cpu": BROKER_CPU, "home": str(fleet.home)}
    return _spawn_python(_AUTH, spec)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, alive: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen within {timeout:g} s")


class SyncerProcess:
    """`fleetpki broker <kind>-sync` running next to a broker, on the broker's CPU."""

    def __init__(self, fleet: Fleet, kind: str, conf_dir: Path, cursor: Path, log: Path) -> None:
        self.cursor = cursor  # the last registry event seq it has acted on
        self.argv = [
            sys.executable,
            "-c",
            _FLEETPKI,
            "broker",
            f"{kind}-sync",
            *("--home", str(fleet.home), "--conf-dir", str(conf_dir)),
        ]
        self.log = log
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with log.open("ab") as sink, on_broker_cpu():
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=sink, env=self.env
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()  # "syncing ... every 0.2 s"
        if not line.startswith("syncing"):
            raise RuntimeError(f"{kind}-sync did not start: {line!r}; see {log}")

    def stop(self) -> None:
        _end(self.proc, how="signal")

    def once(self) -> tuple[float, str]:
        """One `--once` round (the long-running syncer stopped first): seconds, its summary."""
        self.stop()
        t0 = time.perf_counter()
        with self.log.open("ab") as sink, on_broker_cpu():
            done = subprocess.run(
                [*self.argv, "--once"],
                stdout=subprocess.PIPE,
                stderr=sink,
                env=self.env,
                timeout=600,
                check=False,
            )
        took = time.perf_counter() - t0
        out = done.stdout.decode().strip()
        if done.returncode != 0:
            raise RuntimeError(f"{self.argv[4]} --once: exit {done.returncode}: {out}")
        return took, out


_instance = itertools.count(1)


def start_mosquitto(fleet: Fleet) -> BrokerProcess:
    """mosquitto from `fleetpki broker mosquitto-config`, with mosquitto-sync next to it."""
    n = next(_instance)
    out = fleet.root / f"mosquitto{n}"
    port = _free_port()
    mosquitto_config(fleet.home, out, port)  # loopback, dynsec control port, runs as root
    files = MosquittoFiles(out)
    with (fleet.root / f"mosquitto{n}.log").open("wb") as sink, on_broker_cpu():
        proc = subprocess.Popen(["mosquitto", "-c", str(files.conf)], stdout=sink, stderr=sink)
    _wait_listening(port, lambda: proc.poll() is None, "mosquitto", 10)
    broker = BrokerProcess(MOSQUITTO, proc.pid, port, lambda: _end(proc, how="signal"))
    try:
        broker.syncer = SyncerProcess(
            fleet, "mosquitto", out, files.sync_cursor, fleet.root / f"msync{n}.log"
        )
    except BaseException:
        broker.stop()
        raise
    return broker


def start_rabbitmq(fleet: Fleet, auth_port: int) -> BrokerProcess:
    """One RabbitMQ node from `fleetpki broker rabbitmq-config` (tests/rabbitmq_node.py), its
    authorisation asked of the fleetpki process at `auth_port`, rabbitmq-sync next to it."""
    n = next(_instance)
    folder = fleet.root / f"rabbitmq{n}"
    folder.mkdir()
    conf = folder / "conf"
    mqtt_port, management_port, epmd = _free_port(), _free_port(), _free_port()
    rabbitmq_config(fleet.home, conf, mqtt_port, management_port, auth_port)
    with (conf / "rabbitmq.conf").open("a") as f:
        # (b) holds up to 10,000 idle sessions at up to 1.2 MB each on 3.10: the default memory
        # alarm (0.4 of RAM) would block the node before that. Raised for the bench only.
        f.write("vm_memory_high_watermark.relative = 0.8\n")
    node = RabbitNode(folder, conf, f"bench{n}", mqtt_port, management_port, epmd)

    def stop() -> None:
        node.stop(kill=True)  # a throwaway node: no graceful shutdown to wait for
        stop_epmd(epmd)

    t0 = time.monotonic()
    try:
        with on_broker_cpu():
            node.launch()
        node.wait()
        boot = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while (beam := node.beam_pid()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if beam is None:
            raise RuntimeError(f"{node.pidfile}: no pid")
        broker = BrokerProcess(RABBITMQ, beam, mqtt_port, stop)
        broker.boot_s = boot
        broker.memory_breakdown = lambda: rabbitmq_memory(node)
        files = RabbitFiles(conf)
        broker.syncer = SyncerProcess(
            fleet, "rabbitmq", files.folder, files.sync_cursor, folder / "rabbitmq-sync.log"
        )
    except BaseException:
        stop()
        raise
    return broker


def rabbitmq_memory(node: RabbitNode) -> dict[str, float]:
    """The node's own account of its memory (`rabbitmqctl status`: bytes by use), in MB,
    largest first: which part grows with the sessions."""
    data = json.loads(node.ctl("status", "--formatter", "json"))
    memory = data.get("memory", {})
    uses = {k: v / 1e6 for k, v in memory.items() if isinstance(v, int) and k != "total"}
    return dict(sorted(uses.items(), key=lambda kv: -kv[1]))


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
    async with asyncio.timeout(CONNECT_TIMEOUT):  # a broker that stops answering ends the run
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


async def try_connect(port: int, ctx: ssl.SSLContext, cid: str) -> int | None:
    """One CONNECT: the CONNACK code, None when the TLS handshake or the connection failed."""
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=ctx, server_hostname=HOST
            )
            writer.write(connect_packet(cid))
            first, body = await read_packet(reader)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
        return None
    writer.write(DISCONNECT)
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return body[1] if first == 0x20 else None


# ------------------------------------------------------------------ (a) CPU per connect


async def bench_connect_cpu(broker: BrokerProcess, fleet: Fleet, n: int) -> dict[str, Any]:
    ctxs = Contexts(fleet.chain)
    # The warm-up uses other devices than the measured connects: RabbitMQ caches the auth
    # backend's answers per user for 5 s.
    pool = fleet.live()[: n + 50]
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

    await gather_limited(50, 4, lambda i: once(n + i))  # warm-up
    await asyncio.sleep(0.5)
    cpu0, side0, t0 = broker.cpu(), broker.side_cpu(), time.perf_counter()
    await gather_limited(n, 4, once)
    await asyncio.sleep(0.3)  # let the broker finish closing
    cpu = broker.cpu() - cpu0
    side = broker.side_cpu() - side0
    wall = time.perf_counter() - t0
    return {
        "connects": n,
        "cpu_ms_per_connect": cpu * 1000 / n,
        "auth_cpu_ms_per_connect": side * 1000 / n,
        "connects_per_s": n / wall,
    }


# ------------------------------------------------------------------ (b) memory per idle session

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(broker: BrokerProcess, fleet: Fleet, devices: list[Device]) -> list[Conn]:
    ctxs = Contexts(fleet.chain)

    async def one(i: int) -> Conn:
        cid, cert, key = devices[i]
        return await mqtt_connect(broker.port, ctxs.make(cert, key), cid)

    return await gather_limited(len(devices), 32, one)


async def bench_idle_memory(
    broker: BrokerProcess, fleet: Fleet, n: int
) -> tuple[dict[str, Any], list[Conn]]:
    live = fleet.live()
    if len(live) < n + 20:
        raise RuntimeError(f"{len(live)} unrevoked devices left, {n + 20} needed")
    warm = await open_idle(broker, fleet, live[n : n + 20])
    for _, w in warm:
        w.write(DISCONNECT)
        w.close()
    await asyncio.sleep(1.0)
    rss0 = broker.rss()
    uses0 = await asyncio.to_thread(broker.memory_breakdown) if broker.memory_breakdown else {}
    t0 = time.perf_counter()
    conns = await open_idle(broker, fleet, live[:n])
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(2.0)
    rss1 = broker.rss()
    out: dict[str, Any] = {
        "connections": n,
        "rss_before_mb": rss0 / 2**20,
        "rss_after_mb": rss1 / 2**20,
        "kb_per_connection": (rss1 - rss0) / n / 1000,
        "connect_all_s": elapsed,
    }
    if broker.memory_breakdown is not None:
        uses1 = await asyncio.to_thread(broker.memory_breakdown)
        out["memory_breakdown_mb"] = uses1
        growth = {k: (v - uses0.get(k, 0.0)) * 1000 / n for k, v in uses1.items()}
        out["kb_per_connection_by_use"] = {
            k: round(v, 1) for k, v in sorted(growth.items(), key=lambda kv: -kv[1]) if v >= 1
        }
    return out, conns


# ------------------------------------------------------------------ (c) revocation latency


async def bench_revocation(fleet: Fleet, conns: list[Conn], rounds: int) -> dict[str, Any]:
    """Revoke `rounds` of the devices behind `conns` (fleet.live() order), one at a time."""
    registry = Registry.open(fleet.registry)
    devices = fleet.live()[: len(conns)]
    latencies: list[float] = []
    now = datetime.now(UTC)
    step = max(1, len(conns) // rounds)
    try:
        for r in range(rounds):
            i = (r * step) % len(conns)
            reader, _ = conns[i]
            cid = devices[i][0]
            closed = asyncio.ensure_future(reader.read(1))
            await asyncio.to_thread(
                registry.revoke_device,
                DeviceId(cid),
                reason="keyCompromise",
                now=now,
                actor="bench",
            )
            fleet.revoked.add(cid)
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(5):
                    await closed
                latencies.append(time.perf_counter() - t0)
            except (TimeoutError, ConnectionError, ssl.SSLError):
                # The timeout cancels `closed` (awaited directly): cancelled is not dropped.
                dropped = closed.done() and not closed.cancelled()
                latencies.append(time.perf_counter() - t0 if dropped else float("inf"))
            await asyncio.sleep(0.05)
    finally:
        registry.close()
    finite = sorted(latencies)
    return {
        "connected": len(conns),
        "revocations": rounds,
        "p50_ms": statistics.median(finite) * 1000,
        "p99_ms": finite[min(len(finite) - 1, int(len(finite) * 0.99))] * 1000,
        "max_ms": finite[-1] * 1000,
        "not_dropped_within_5_s": sum(1 for x in latencies if x == float("inf")),
        "latencies_ms": [None if x == float("inf") else round(x * 1000, 1) for x in latencies],
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
        async with asyncio.timeout(120):
            await done.wait()
    except TimeoutError:
        pass  # QoS 0 messages may be dropped: reported as received < messages
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


# ------------------------------------------------------------------ (e) a fleet becomes allowed


async def bench_allowed(broker: BrokerProcess, fleet: Fleet, prefix: str) -> dict[str, Any]:
    devices, records = fleet.pending.pop(prefix)
    ctxs = Contexts(fleet.chain)
    last = devices[-1]
    ctx = ctxs.make(last[1], last[2])
    refused_before = await try_connect(broker.port, ctx, last[0])
    registry = Registry.open(fleet.registry)
    try:
        t0 = time.perf_counter()
        await asyncio.to_thread(register, registry, f"bench-{prefix}", records)
        registered = time.perf_counter()
    finally:
        registry.close()
    attempts = 0
    code: int | None = None
    while time.perf_counter() - registered < 60:
        attempts += 1
        code = await try_connect(broker.port, ctx, last[0])
        if code == 0:
            break
        await asyncio.sleep(0.02)
    allowed = time.perf_counter()
    fleet.devices += devices  # registered now: usable by what follows
    return {
        "devices": len(devices),
        "connack_before_registration": refused_before,
        "register_s": registered - t0,
        "commit_to_connack_ms": (allowed - registered) * 1000 if code == 0 else None,
        "attempts": attempts,
    }


def reconcile(broker: BrokerProcess, fleet: Fleet) -> dict[str, Any]:
    """The syncer's cursor set back to 0, one `--once` round timed (see (e) in the doc)."""
    assert broker.syncer is not None
    broker.syncer.stop()
    broker.syncer.cursor.write_text("0\n")
    with Registry.open(fleet.registry) as registry:
        events = registry.last_event_seq()
    took, summary = broker.syncer.once()
    kicked = re.search(r"dropped (\d+) session", summary)
    return {
        "events": events,
        "once_s": took,
        "kicked": int(kicked.group(1)) if kicked else None,
        "summary": summary[:200],
    }


# ------------------------------------------------------------------ report


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f} ms"


def _md(result: dict[str, Any]) -> str:
    names = [n for n in (EMBEDDED, MOSQUITTO, RABBITMQ) if n in result["connect_cpu"]]
    a, b, c = result["connect_cpu"], result["idle_memory"], result["revocation"]
    d, e = result["throughput"], result["allowed"]
    rounds = a[names[0]]["rounds"]
    mos = a.get(MOSQUITTO)

    def row(label: str, cells: list[str], target: str) -> str:
        return f"| {label} | {' | '.join(cells)} | {target} |"

    def cpu_cell(name: str) -> str:
        r = a[name]
        text = f"{r['cpu_ms_per_connect']:.2f} ms"
        if mos is not None and name != MOSQUITTO:
            text += f" ({r['cpu_ms_per_connect'] / mos['cpu_ms_per_connect']:.2f} x)"
        text += f"; {r['median_cpu_ms_per_connect']:.2f} ms"
        if r["auth_cpu_ms_per_connect"]:
            text += f" + fleetpki auth {r['auth_cpu_ms_per_connect']:.2f} ms"
        return text

    def mem_cell(name: str) -> str:
        r = b[name]
        text = f"{r['kb_per_connection']:.1f} KB ({r['rss_after_mb']:,.0f} MiB total"
        if r["connections"] != b[names[0]]["connections"]:
            text += f" at {r['connections']:,}"
        text += ")"
        stock = b.get("stock amqtt 0.12.1")
        if name == EMBEDDED and stock:
            text += f"; stock amqtt 0.12.1: {stock['kb_per_connection']:.0f} KB at "
            text += f"{stock['connections']:,}"
        return text

    def qos_cell(name: str, qos: int) -> str:
        r = d[f"{name} qos{qos}"]
        text = f"{r['msgs_per_s']:,.0f}"
        if r["received"] < r["messages"]:
            text += f" ({r['messages'] - r['received']:,} of {r['messages']:,} lost)"
        text += f"; {r['min_broker_cpu_us_per_msg']:.0f} us CPU/msg"
        off = d.get(f"{EMBEDDED} (no policy) qos{qos}")
        if name == EMBEDDED and off:
            on_cpu, off_cpu = r["min_broker_cpu_us_per_msg"], off["min_broker_cpu_us_per_msg"]
            text += (
                f"; without policy {off['msgs_per_s']:,.0f}, overhead "
                f"{100 * (on_cpu / off_cpu - 1):.1f}% by CPU/msg"
            )
        return text

    def drop_cell(name: str) -> str:
        r = c[name]
        text = f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms"
        if r["not_dropped_within_5_s"]:
            text += f" ({r['not_dropped_within_5_s']} not dropped in 5 s)"
        return text

    def allowed_cell(name: str) -> str:
        r = e[name]
        if r["connack_before_registration"] == 0:
            text = "accepted before the commit too (certificate alone)"
        else:
            text = (
                f"{_ms(r['commit_to_connack_ms'])} after the commit (CONNACK "
                f"{r['connack_before_registration']} before it)"
            )
        text += f"; registry write {r['register_s']:.1f} s"
        rec = r.get("reconcile")
        if rec:
            text += (
                f"; syncer from cursor 0 ({rec['events']:,} events, {rec['kicked']} kicks): "
                f"{rec['once_s']:.1f} s"
            )
        return text

    first_e = e[names[0]]
    first_c = c[names[0]]
    boot = result.get("rabbitmq_boot_s")
    lines = [
        "## MQTT brokers: embedded, mosquitto, RabbitMQ (bench/broker.py)",
        "",
        f"Run {result['date']} on {result['machine']}. {result.get('conditions', '')}"
        "Each broker (and the fleetpki processes working for it) pinned to one core, the load "
        "generator to the other; EC P-256 certificates from one fleetpki home, TLS 1.3. "
        f"Command: `{result.get('command', '.venv/bin/python bench/broker.py')}`.",
        "",
        f"| figure | {' | '.join(names)} | target |",
        "|---|" + "---|" * len(names) + "---|",
        row(
            f"(a) broker CPU per fresh mTLS connect (lowest of {rounds}; median)",
            [cpu_cell(n) for n in names],
            "embedded <= 1.5 x mosquitto",
        ),
        row(
            f"(b) RSS per idle mTLS session at {b[names[0]]['connections']:,}",
            [mem_cell(n) for n in names],
            "embedded <= 64 KB",
        ),
        row(
            f"(c) revocation to disconnect, {first_c['connected']:,} connected, "
            f"{first_c['revocations']} revocations",
            [drop_cell(n) for n in names],
            "p99 <= 1 s",
        ),
        *(
            row(
                f"(d) QoS {qos} msgs/s, one device to one service (best of "
                f"{d[names[0] + f' qos{qos}']['rounds']}); broker CPU per message",
                [qos_cell(n, qos) for n in names],
                "policy overhead <= 10%",
            )
            for qos in (0, 1)
        ),
        row(
            f"(e) a new batch of {first_e['devices']:,} devices: commit to the last one's "
            "CONNACK 0",
            [allowed_cell(n) for n in names],
            "",
        ),
        "",
    ]
    if boot is not None:
        lines.append(f"RabbitMQ node boot (launch to MQTT + management listening): {boot:.1f} s.")
        lines.append("")
    lines.append(
        "Notes. (a) CPU time on a shared machine is only ever inflated by other load, so each "
        "broker's lowest round is its figure (medians alongside); RabbitMQ's figure is the "
        "Erlang VM's (beam.smp), and the fleetpki process answering its HTTP auth backend "
        "(two calls per connect behind RabbitMQ's 5 s cache) is shown beside it. (b) RabbitMQ's "
        "RSS is beam.smp's, its management plugin's statistics included. (c) The embedded "
        "broker polls the registry's event log every 200 ms; mosquitto-sync (CRL + SIGHUP + "
        "dynamic-security kick) and rabbitmq-sync (CRL file + management API kick) poll every "
        "200 ms too. (d) One device publishing to one subscribed service; rates swing by +-15% "
        "between identical runs here. (e) No broker keeps a per-device copy of the fleet, so "
        "a new batch is allowed as soon as its commit is visible; a syncer that lost its "
        "cursor replays every registry event once. Raw numbers: bench/results/broker.json."
    )
    lines.append("")
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


def _best(rs: list[dict[str, Any]], key: str, lowest: bool) -> dict[str, Any]:
    return (min if lowest else max)(rs, key=lambda r: r[key])


async def run(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    chosen = [BROKERS[b] for b in args.brokers]
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {_versions(chosen)}",
        "command": "bench/broker.py " + " ".join(sys.argv[1:]),
        "connect_cpu": {},
        "idle_memory": {},
        "revocation": {},
        "throughput": {},
        "allowed": {},
    }
    auth: subprocess.Popen[bytes] | None = None
    auth_port = 0

    def save() -> None:
        """What is measured so far, so an interrupted run keeps it (`--render` shows it)."""
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    boots: list[float] = []

    def starter(name: str, policy: bool = True) -> Callable[[], BrokerProcess]:
        def start() -> BrokerProcess:
            if name == EMBEDDED:
                return start_ours(fleet, policy=policy)
            if name == MOSQUITTO:
                return start_mosquitto(fleet)
            assert auth is not None
            broker = start_rabbitmq(fleet, auth_port)
            broker.side = psutil.Process(auth.pid)
            assert broker.boot_s is not None
            boots.append(broker.boot_s)
            return broker

        return start

    try:
        if RABBITMQ in chosen:
            auth, auth_port = start_auth_server(fleet)
        # (a) interleaved rounds on fresh brokers; each keeps its lowest CPU per connect.
        connects: dict[str, list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            # Alternate the order: whatever drifts during a round must not favour one broker.
            for name in chosen[:: 1 if rnd % 2 == 0 else -1]:
                broker = starter(name)()
                try:
                    print(f"[a] {name}: {args.connects} connects", flush=True)
                    connects.setdefault(name, []).append(
                        await bench_connect_cpu(broker, fleet, args.connects)
                    )
                finally:
                    broker.stop()
                result.setdefault("partial", {})["connect_cpu"] = connects
                save()
        for name, rs in connects.items():
            result["connect_cpu"][name] = {
                **_best(rs, "cpu_ms_per_connect", lowest=True),
                "rounds": len(rs),
                "all_cpu_ms_per_connect": [round(r["cpu_ms_per_connect"], 3) for r in rs],
                "median_cpu_ms_per_connect": statistics.median(r["cpu_ms_per_connect"] for r in rs),
            }
        # (d) interleaved rounds, fresh broker each time; each keeps its best rate.
        configs = [(n, starter(n)) for n in chosen]
        if EMBEDDED in chosen:
            configs.insert(1, (f"{EMBEDDED} (no policy)", starter(EMBEDDED, policy=False)))
        runs: dict[str, list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            for name, start in configs[:: 1 if rnd % 2 == 0 else -1]:
                for qos in (0, 1):
                    broker = start()
                    try:
                        print(f"[d] {name}: QoS {qos}, {args.messages} messages", flush=True)
                        runs.setdefault(f"{name} qos{qos}", []).append(
                            await bench_throughput(broker, fleet, qos, args.messages)
                        )
                    finally:
                        broker.stop()
                result.setdefault("partial", {})["throughput"] = runs
                save()
        for key, rs in runs.items():
            result["throughput"][key] = {
                **_best(rs, "msgs_per_s", lowest=False),
                "rounds": len(rs),
                "all_msgs_per_s": [round(r["msgs_per_s"]) for r in rs],
                "median_broker_cpu_us_per_msg": statistics.median(
                    r["broker_cpu_us_per_msg"] for r in rs
                ),
                "min_broker_cpu_us_per_msg": min(r["broker_cpu_us_per_msg"] for r in rs),
            }
        # (b), (c) and (e) on one broker each: idle sessions, then revocations among the first
        # --drop-connections of them (the rest closed), then a new batch becoming allowed.
        for name in chosen:
            broker = starter(name)()
            conns: list[Conn] = []
            try:
                count = args.rabbitmq_connections if name == RABBITMQ else args.connections
                print(f"[b] {name}: {count} idle sessions", flush=True)
                result["idle_memory"][name], conns = await bench_idle_memory(broker, fleet, count)
                for _, w in conns[args.drop_connections :]:
                    w.transport.abort()
                conns = conns[: args.drop_connections]
                await asyncio.sleep(2.0)
                print(f"[c] {name}: {args.revocations} revocations", flush=True)
                result["revocation"][name] = await bench_revocation(fleet, conns, args.revocations)
                for _, w in conns:
                    w.transport.abort()
                conns = []
                await asyncio.sleep(1.0)
                print(f"[e] {name}: a batch of {args.allow_batch} becomes allowed", flush=True)
                allowed = await bench_allowed(broker, fleet, _prefix(name))
                if broker.syncer is not None:
                    allowed["reconcile"] = reconcile(broker, fleet)
                result["allowed"][name] = allowed
                save()
            finally:
                for _, w in conns:
                    w.transport.abort()
                broker.stop()
        if args.stock_connections and EMBEDDED in chosen:
            broker = start_stock(fleet)
            conns = []
            try:
                print(f"[b] stock amqtt: {args.stock_connections} idle sessions", flush=True)
                result["idle_memory"][broker.name], conns = await bench_idle_memory(
                    broker, fleet, args.stock_connections
                )
            finally:
                for _, w in conns:
                    w.transport.abort()
                broker.stop()
    finally:
        if auth is not None:
            _end(auth)
    if boots:
        result["rabbitmq_boot_s"] = statistics.median(boots)
    result.pop("partial", None)
    return result


def _prefix(name: str) -> str:
    return {EMBEDDED: "emb", MOSQUITTO: "mos", RABBITMQ: "rmq"}[name]


def _versions(chosen: list[str]) -> str:
    out = []
    if MOSQUITTO in chosen:
        done = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
        first = (done.stdout or done.stderr).splitlines()[0:1]
        out.append(first[0].strip() if first else "mosquitto")
    if RABBITMQ in chosen:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"],
            capture_output=True,
            text=True,
            check=False,
        )
        out.append(f"rabbitmq-server {done.stdout.strip() or '?'}")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--connections", type=int, default=10_000, help="(b) idle sessions")
    ap.add_argument(
        "--drop-connections", type=int, default=2_000, help="(c) sessions kept connected"
    )
    ap.add_argument("--connects", type=int, default=400, help="(a) connects per round")
    ap.add_argument("--revocations", type=int, default=200, help="(c) revocations per broker")
    ap.add_argument("--messages", type=int, default=20_000, help="(d) messages per round")
    ap.add_argument("--allow-batch", type=int, default=10_000, help="(e) new devices")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds of (a) and (d)")
    ap.add_argument("--stock-connections", type=int, default=2_000)
    ap.add_argument(
        "--rabbitmq-connections",
        type=int,
        help="(b) idle sessions for RabbitMQ (default --connections; 0.3-1.2 MB each)",
    )
    ap.add_argument(
        "--brokers",
        type=lambda s: s.split(","),
        default=list(BROKERS),
        help="comma-separated subset of " + ",".join(BROKERS),
    )
    ap.add_argument("--conditions", default="", help="a sentence on the machine's other load")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "broker.json")
    ap.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary fleet folder")
    ap.add_argument("--render", type=Path, help="only re-render --md from this result JSON")
    args = ap.parse_args()
    if args.render:
        write_md(args.md, _md(json.loads(args.render.read_text())))
        return
    if args.rabbitmq_connections is None:
        args.rabbitmq_connections = args.connections
    unknown = set(args.brokers) - set(BROKERS)
    if unknown:
        sys.exit(f"--brokers: unknown {', '.join(sorted(unknown))} (known: {', '.join(BROKERS)})")
    chosen = [BROKERS[b] for b in args.brokers]
    if MOSQUITTO in chosen and shutil.which("mosquitto") is None:
        sys.exit("mosquitto is not installed (Debian: apt-get install mosquitto)")
    if RABBITMQ in chosen and not RABBITMQ_SERVER.exists():
        sys.exit("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
    if not args.connects <= args.connections or not args.drop_connections <= min(
        args.connections, args.rabbitmq_connections
    ):
        sys.exit("--connects and --drop-connections must not exceed --connections")
    if args.revocations > args.drop_connections:
        sys.exit("--revocations must not exceed --drop-connections")
    # Every broker holds --connections sockets, and so does this process.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 2_000
    if hard != resource.RLIM_INFINITY and hard < want:
        sys.exit(f"open files: hard limit {hard} < {want} (raise it with ulimit -Hn)")
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else hard, hard)
    )
    os.sched_setaffinity(0, {LOAD_CPU})
    tmp = Path(tempfile.mkdtemp(prefix="fleetpki-bench-broker-"))
    try:
        # Each broker's (c) revokes its own devices: enough for every (b) after it.
        n = args.connections + 21 + args.revocations * len(chosen)
        print(f"building a fleet of {n} devices (+{args.allow_batch} per broker) in {tmp}")
        t0 = time.perf_counter()
        fleet = build_fleet(tmp, n, {_prefix(c): args.allow_batch for c in chosen})
        print(f"fleet built in {time.perf_counter() - t0:.0f} s", flush=True)
        result = asyncio.run(run(args, fleet))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.conditions:
        result["conditions"] = args.conditions.rstrip(". ") + ". "
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    section = _md(result)
    print()
    print(section)
    if args.md:
        write_md(args.md, section)


if __name__ == "__main__":
    main()
