"""kill -9 of `fleetpki serve` during an enrollment and renewal storm (issue 18, campaign 1;
issue 15, a node killed under a storm): the one driver behind
tests/integration/test_kill_serve.py, tests/integration/test_cluster_kill.py and
bench/faults_kill.py.

`fleetpki serve` runs as real processes (`Node`) on fixed loopback ports, so that clients and
agents find a restarted node where it was. The storm (`Storm`):
- enrollers: threads doing EST simpleenroll (HTTP Basic, one-time token) for devices minted
  before the first start; after a reply that never came (the node died), half retry with the
  same key (the server replays the certificate if the first attempt was recorded), half with a
  new key (then the answer must be 401 "used" if, and only if, the first attempt was recorded);
- renewers: threads doing EST simplereenroll over mutual TLS with the newest certificate they
  received, a new key each time, again and again; after a lost reply they renew again from the
  same certificate (README: "One current certificate per identity", the fallback);
- agents: real device_agent.Agents (enroll, MQTT session on the embedded broker, renewal),
  which must carry on by themselves.
Every certificate any of them received is kept (`Ledger`), even one whose reply arrived a
moment before the kill, and checked against the registry (`check`): present with the same
fingerprint and the right status, at most one certificate per token, no serial twice, SQLite's
`PRAGMA integrity_check` ok.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_agent.agent import Agent, AgentState
from device_agent.backoff import Backoff
from device_agent.config import load_config
from device_agent.events import AgentEvent
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import HomeLayout, hash_secret, new_secret, registry_location
from enroll_server.pki.keys import KeyType, PrivateKey, generate_key, private_key_pem
from enroll_server.registry import CertStatus, Registry
from enroll_server.registry.codec import CERTIFICATE_COLUMNS, certificate_from_row
from enroll_server.registry.location import SqliteLocation
from enroll_server.registry.models import CertificateRecord, NewDevice
from fleetpki.identity import DeviceId
from tests.est_client import Reply, enroll_headers, request
from tests.pki_helpers import csr_der, make_csr
from tests.rabbitmq_node import free_port

ROOT = Path(__file__).resolve().parents[1]
EST = "/.well-known/est"
FAST = Backoff(base=0.2, factor=2.0, cap=1.0)
PEM = serialization.Encoding.PEM


# -- the server: `fleetpki serve` as a process on fixed ports --------------------------------
@dataclass
class Node:
    """One `fleetpki serve` on ports that stay the same across restarts."""

    name: str
    home: Path
    log: Path
    broker: bool = True
    est_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def est_url(self) -> str:
        return f"https://127.0.0.1:{self.est_port}"

    def ssl(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(HomeLayout(self.home).root_cert))
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(self.home),
               "--est-port", str(self.est_port), "--http-port", str(self.http_port),
               "--admin-port", str(self.admin_port)]  # fmt: skip
        cmd += ["--mqtt-port", str(self.mqtt_port)] if self.broker else ["--no-broker"]
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} at {datetime.now(UTC).isoformat()} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.starts += 1

    def serving(self) -> bool:
        """One EST request answered 200 (GET cacerts: TLS, the route, the CA files)."""
        try:
            reply = request(self.est_url + EST + "/cacerts", self.ssl(), timeout=2)
        except OSError:
            return False
        return reply.status == 200

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not serving after {timeout:.0f} s; {self.log}")
            time.sleep(0.02)

    def kill(self) -> None:
        """kill -9: no handler runs, nothing is flushed or closed by the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _die_with_parent() -> None:
    """In the child: SIGKILL if the test process dies, so no server outlives it (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# -- what clients received -------------------------------------------------------------------
@dataclass(frozen=True)
class Got:
    """One certificate a client received."""

    device: str
    serial: int
    fingerprint: str

    @classmethod
    def of(cls, cert: x509.Certificate) -> Got:
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(str(cn), cert.serial_number, hashlib.sha256(der).hexdigest())


@dataclass
class Ledger:
    """Everything the clients saw, shared by their threads."""

    received: dict[str, list[Got]] = field(default_factory=dict)  # per device, in order
    enrollers: set[str] = field(default_factory=set)  # devices that only ever simpleenroll
    lost_then_used: set[str] = field(default_factory=set)  # 401 "used" after a lost reply
    in_flight: int = 0
    requests: int = 0
    lost_replies: int = 0  # requests that died with the server (outcome unknown to the client)
    retried_503: int = 0
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def got(self, cert: x509.Certificate) -> None:
        got = Got.of(cert)
        with self.lock:
            chain = self.received.setdefault(got.device, [])
            if got not in chain:  # a replayed reply is the same certificate
                chain.append(got)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self.lock:
            self.in_flight += 1
            self.requests += 1
        try:
            yield
        finally:
            with self.lock:
                self.in_flight -= 1

    def certificates(self) -> int:
        with self.lock:
            return sum(len(chain) for chain in self.received.values())


def leaf(reply: Reply) -> x509.Certificate:
    (ee,) = [
        c
        for c in decode_certs_only(reply.body)
        if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ]
    return ee


def _csr(key: PrivateKey, device: str) -> bytes:
    return base64.b64encode(csr_der(make_csr(key, device)))


# -- the storm -------------------------------------------------------------------------------
@dataclass
class StormConfig:
    enrollers: int = 6  # threads doing simpleenroll with tokens
    renewers: int = 4  # threads (one device each) doing simplereenroll over and over
    agents: int = 3  # real device agents
    tokens: int = 400  # devices minted for the enrollers
    pause: float = 0.0  # seconds a client waits between its requests


class Storm:
    """Clients and agents against `nodes`; `start()`, then kill and restart nodes at will,
    then `finish()` and `check()`."""

    def __init__(self, nodes: Sequence[Node], work: Path, config: StormConfig, seed: int) -> None:
        self.nodes = list(nodes)
        self.work = work
        self.config = config
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.running = threading.Event()
        self.threads: list[threading.Thread] = []
        self.tokens: list[tuple[str, str]] = []
        self.token_lock = threading.Lock()
        self.identities: dict[str, tuple[Path, Path]] = {}  # renewer device: cert, key
        self.agents: list[Agent] = []
        self.agent_events: Counter[str] = Counter()
        self.agent_loop: asyncio.AbstractEventLoop | None = None
        self.agent_thread: threading.Thread | None = None
        self.agent_tasks: list[concurrent.futures.Future[Any]] = []
        self.agent_configs: list[Path] = []

    @property
    def home(self) -> Path:
        return self.nodes[0].home

    # -- set-up --------------------------------------------------------------------------
    def mint(self) -> None:
        """Before any node starts: the enrollers' devices (one token each), the renewers' and
        the agents' bundles."""
        now = datetime.now(UTC)
        rows, self.tokens = [], []
        for i in range(self.config.tokens + self.config.renewers):
            device = f"st-{i:05d}"
            token = new_secret()
            rows.append(NewDevice(DeviceId(device), hash_secret(token)))
            self.tokens.append((device, token))
        with Registry.open(registry_location(HomeLayout(self.home))) as registry:
            registry.create_batch(
                "storm", rows, kind="token", token_ttl=timedelta(days=1), now=now, actor="storm"
            )
        renewing = self.tokens[self.config.tokens :]
        self.tokens = self.tokens[: self.config.tokens]
        self._renewing = renewing
        self.agent_configs = self.agent_bundles() if self.config.agents else []

    def enroll_renewers(self) -> None:
        """Once a node serves: the renewers' first certificates (plain enrollments)."""
        for device, token in self._renewing:
            key = generate_key(KeyType.EC_P256)
            reply = self._post(
                self.nodes[0], "simpleenroll", _csr(key, device), token=(device, token)
            )
            assert reply.status == 200, (reply.status, reply.text)
            cert = leaf(reply)
            self.ledger.got(cert)
            self.identities[device] = self._write_identity(device, cert, key)

    def _write_identity(
        self, device: str, cert: x509.Certificate, key: PrivateKey
    ) -> tuple[Path, Path]:
        folder = self.work / "renewers" / device
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / "cert.pem", folder / "key.pem"
        # Replaced atomically: a kill of the test itself never leaves half a file to read.
        for path, data in (
            (cert_path, cert.public_bytes(PEM)),
            (key_path, private_key_pem(key, None)),
        ):
            fd, tmp = tempfile.mkstemp(dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return cert_path, key_path

    def agent_bundles(self) -> list[Path]:
        """`fleetpki batch create` of the agents' bundles, naming every node's EST and broker."""
        from typer.testing import CliRunner

        from enroll_server.cli.app import app

        out = self.work / "agents"
        args = ["batch", "create", "--home", str(self.home), "--count",
                str(self.config.agents), "--prefix", "ag-", "--out", str(out)]  # fmt: skip
        for node in self.nodes:
            args += ["--est-url", f"https://localhost:{node.est_port}"]
            args += ["--broker", f"localhost:{node.mqtt_port}"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return sorted(out.glob("ag-*/agent.toml"))

    # -- running ---------------------------------------------------------------------------
    def start(self) -> None:
        self.running.set()
        for i in range(self.config.enrollers):
            self._thread(self._enroller, f"enroller-{i}", random.Random(self.rng.random()))
        for device in self.identities:
            self._thread(
                self._renewer, f"renewer-{device}", device, random.Random(self.rng.random())
            )
        if self.agent_configs:
            self._start_agents(self.agent_configs)

    def _thread(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _next_token(self) -> tuple[str, str] | None:
        with self.token_lock:
            return self.tokens.pop() if self.tokens else None

    def _post(
        self,
        node: Node,
        op: str,
        body: bytes,
        *,
        token: tuple[str, str] | None = None,
        identity: tuple[Path, Path] | None = None,
    ) -> Reply:
        headers = enroll_headers(*token) if token else {"Content-Type": "application/pkcs10"}
        ctx = node.ssl(*identity) if identity else node.ssl()
        with self.ledger.request():
            return request(node.est_url + EST + "/" + op, ctx, "POST", body, headers, timeout=20)

    def _attempt(self, rng: random.Random, op: str, body: bytes, **kw: Any) -> Reply | str:
        """One request to a node chosen at random (the next one if it refuses the
        connection); 'refused' (nothing was sent) or 'lost' (sent, the reply never came)."""
        order = rng.sample(self.nodes, len(self.nodes))
        for node in order:
            try:
                return self._post(node, op, body, **kw)
            except ConnectionRefusedError:
                continue
            except (OSError, ssl.SSLError, EOFError, ValueError):
                return "lost"
            except Exception as exc:  # http.client's RemoteDisconnected, IncompleteRead...
                if type(exc).__module__ == "http.client":
                    return "lost"
                raise
        return "refused"

    def _enroller(self, rng: random.Random) -> None:
        """simpleenroll each minted device until it has its certificate (or, after a lost
        reply and a retry with a new key, the token is reported used)."""
        ledger = self.ledger
        while self.running.is_set():
            pick = self._next_token()
            if pick is None:
                return
            device, token = pick
            same_key = int(device[3:]) % 2 == 0
            with ledger.lock:
                ledger.enrollers.add(device)
            key = generate_key(KeyType.EC_P256)
            lost = False
            # Once started, a device is seen through to its answer even as the storm ends.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if lost and not same_key:
                    key = generate_key(KeyType.EC_P256)
                outcome = self._attempt(
                    rng, "simpleenroll", _csr(key, device), token=(device, token)
                )
                if outcome == "lost":
                    lost = True
                    with ledger.lock:
                        ledger.lost_replies += 1
                if isinstance(outcome, str) or outcome.status == 503:
                    if not isinstance(outcome, str):
                        with ledger.lock:
                            ledger.retried_503 += 1
                    time.sleep(0.05 + rng.random() * 0.1)
                    continue
                if outcome.status == 200:
                    cert = leaf(outcome)
                    ledger.got(cert)
                    if cert.public_key() != key.public_key():
                        ledger.violation(
                            f"{device}: simpleenroll answered another key's certificate"
                        )
                elif outcome.status == 401 and lost and not same_key:
                    with ledger.lock:
                        ledger.lost_then_used.add(device)
                else:
                    ledger.violation(
                        f"{device}: simpleenroll answered {outcome.status} "
                        f"({'after a lost reply' if lost else 'first answer'}, "
                        f"{'same' if same_key else 'new'} key): {outcome.text[:200]}"
                    )
                break
            else:
                ledger.violation(f"{device}: no answer to simpleenroll within 120 s")
            if self.config.pause:
                time.sleep(self.config.pause)

    def _renewer(self, device: str, rng: random.Random) -> None:
        """simplereenroll from the newest certificate received, again and again."""
        ledger = self.ledger
        attempts_left = 0
        while self.running.is_set() or attempts_left > 0:
            identity = self.identities[device]
            key = generate_key(KeyType.EC_P256)
            outcome = self._attempt(rng, "simplereenroll", _csr(key, device), identity=identity)
            if outcome == "lost":
                with ledger.lock:
                    ledger.lost_replies += 1
            if isinstance(outcome, str) or outcome.status == 503:
                # Unfinished: after the storm ends, keep going until one renewal succeeds, so
                # that the newest certificate received is the identity's current one.
                attempts_left = 200
                time.sleep(0.05 + rng.random() * 0.1)
                continue
            if outcome.status != 200:
                ledger.violation(
                    f"{device}: simplereenroll answered {outcome.status}: {outcome.text[:200]}"
                )
                return
            cert = leaf(outcome)
            ledger.got(cert)
            if cert.public_key() != key.public_key():
                ledger.violation(f"{device}: simplereenroll answered another key's certificate")
            self.identities[device] = self._write_identity(device, cert, key)
            attempts_left = 0
            if self.config.pause:
                time.sleep(self.config.pause)

    # -- agents ------------------------------------------------------------------------------
    def _start_agents(self, configs: list[Path]) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.agent_loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            ready.set()
            loop.run_forever()

        self.agent_thread = threading.Thread(target=run, name="storm-agents", daemon=True)
        self.agent_thread.start()
        ready.wait(5)
        for config in configs:
            agent = Agent(
                load_config(config),
                est_backoff=FAST,
                mqtt_backoff=FAST,
                on_event=self._agent_event_handler(),
            )
            self.agents.append(agent)
            self.agent_tasks.append(asyncio.run_coroutine_threadsafe(agent.run(), loop))

    def _agent_event_handler(self) -> Any:
        def on_event(event: AgentEvent) -> None:
            self.agent_events[event.kind] += 1
            # The agent stores its identity before it tells of an enrollment or renewal.
            for agent in self.agents:
                if agent.identity is not None:
                    self.ledger.got(agent.identity.cert)

        return on_event

    def agents_on(self, node: Node) -> list[Agent]:
        """Agents whose MQTT session is on `node`'s broker now."""
        return [
            a
            for a in self.agents
            if a.state is AgentState.CONNECTED
            and a.link is not None
            and a.link.port == node.mqtt_port
        ]

    def agents_connected(self) -> bool:
        """Every agent connected, to a broker of a node that is running."""
        up = {n.mqtt_port for n in self.nodes if n.proc is not None and n.proc.poll() is None}
        return all(
            a.state is AgentState.CONNECTED and a.link is not None and a.link.port in up
            for a in self.agents
        )

    def wait_agents(self, timeout: float, *, connected_after: datetime | None = None) -> float:
        """Seconds until every agent is connected (a session opened after `connected_after`)."""
        started = time.monotonic()
        while True:
            done = self.agents_connected() and (
                connected_after is None
                or all(a.last_connected and a.last_connected > connected_after for a in self.agents)
            )
            if done:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                states = {
                    str(a.device_id): (str(a.state), a.renewals, a.last_error) for a in self.agents
                }
                raise AssertionError(f"agents did not carry on within {timeout:.0f} s: {states}")
            time.sleep(0.05)

    # -- the end -----------------------------------------------------------------------------
    def finish(self, timeout: float = 120) -> None:
        """Stop starting new work; let every client finish what it started."""
        self.running.clear()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            self.ledger.violation(f"clients still running after {timeout:.0f} s: {alive}")
        # Agents stop before the last look, so that none is in the middle of a renewal.
        self.stop_agents()
        for agent in self.agents:
            if agent.identity is not None:
                self.ledger.got(agent.identity.cert)

    def stop_agents(self) -> None:
        if self.agent_loop is None:
            return
        for agent in self.agents:
            self.agent_loop.call_soon_threadsafe(agent.stop)
        for task in self.agent_tasks:
            with contextlib.suppress(Exception):
                task.result(15)
        loop = self.agent_loop
        # What the agents leave behind (MQTT clients' helper tasks) ends on the loop before it
        # closes, rather than calling into a closed loop when collected.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self.agent_thread is not None:
            self.agent_thread.join(10)
        if not loop.is_running():
            loop.close()
        self.agent_loop = None


async def _cancel_the_rest() -> None:
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


# -- the checks ------------------------------------------------------------------------------
@dataclass
class Checked:
    certificates: int = 0  # certificates received by clients, checked against the registry
    unreceived: int = 0  # certificates in the registry no client received (replies lost)
    violations: list[str] = field(default_factory=list)


def integrity(home: Path) -> str | None:
    """SQLite's PRAGMA integrity_check on the registry file, read-only; None for PostgreSQL."""
    location = registry_location(HomeLayout(home))
    if not isinstance(location, SqliteLocation):
        return None
    conn = sqlite3.connect(f"file:{location.path}?mode=ro", uri=True, timeout=10)
    try:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def check(home: Path, ledger: Ledger, *, final: bool) -> Checked:
    """Every certificate any client received against the registry.

    Always: each is there, with the same fingerprint; no serial names two certificates; an
    enroller's device (one token) has at most one certificate, exactly one if the client was
    told "used" after a lost reply; the SQLite file passes integrity_check. `final` (every
    client finished its last request): the newest certificate each client received is its
    identity's one active certificate, and every older one it received is superseded or
    revoked as superseded (RFC 5280 5.3.1).
    """
    result = Checked()
    bad = result.violations
    state = integrity(home)
    if state is not None and state != "ok":
        bad.append(f"integrity_check: {state}")
    with ledger.lock:
        received = {device: list(chain) for device, chain in ledger.received.items()}
        enrollers = set(ledger.enrollers)
        lost_then_used = set(ledger.lost_then_used)
    seen: dict[int, Got] = {}
    by_device: dict[str, dict[int, CertificateRecord]] = {}
    with Registry.open(registry_location(HomeLayout(home))) as registry:
        # One read of the whole table (certificates_of per device: a round trip each).
        with registry._read() as conn:
            rows = conn.execute(f"SELECT {CERTIFICATE_COLUMNS} FROM certificates").fetchall()
    for row in rows:
        one = certificate_from_row(row)
        by_device.setdefault(one.device_id.value, {})[one.serial] = one
    for device in sorted(set(received) | enrollers):
        chain = received.get(device, [])
        records = by_device.get(device, {})
        for got in chain:
            result.certificates += 1
            other = seen.setdefault(got.serial, got)
            if other != got:
                bad.append(f"serial {got.serial:x} received twice: {other} and {got}")
            record = records.get(got.serial)
            if record is None:
                bad.append(f"{device}: certificate {got.serial:x} received, not in the registry")
            elif record.fingerprint_sha256 != got.fingerprint:
                bad.append(f"{device}: serial {got.serial:x} names another certificate")
        result.unreceived += len(set(records) - {g.serial for g in chain})
        if device in enrollers:
            if len(records) > 1:
                bad.append(f"{device}: one token, {len(records)} certificates")
            if device in lost_then_used and len(records) != 1:
                bad.append(f"{device}: told 'used' after a lost reply, {len(records)} recorded")
        if final and chain:
            *older, newest = chain
            active = [r for r in records.values() if r.status is CertStatus.ACTIVE]
            if [r.serial for r in active] != [newest.serial]:
                bad.append(
                    f"{device}: active {[f'{r.serial:x}' for r in active]}, newest "
                    f"received {newest.serial:x}"
                )
            for got in older:
                record = records.get(got.serial)
                if record is not None and not _superseded(record.status, record.revocation_reason):
                    bad.append(f"{device}: older certificate {got.serial:x} is {record.status}")
    return result


def _superseded(status: CertStatus, reason: str | None) -> bool:
    return status is CertStatus.SUPERSEDED or (
        status is CertStatus.REVOKED and reason == "superseded"
    )


# -- the campaign: kills at random moments, a check after each restart -------------------------
@dataclass
class Kill:
    node: str
    after: float  # seconds of storm before the kill
    in_flight: int  # client requests sent and not yet answered at the kill
    to_serving: float  # seconds from SIGKILL to the restarted node's first 200
    agents_back: float | None = None  # seconds from SIGKILL until every agent was connected
    agents_on: int = 0  # agents whose MQTT session was on the killed node


@dataclass
class Campaign:
    kills: list[Kill] = field(default_factory=list)
    checked: Checked = field(default_factory=Checked)
    agents_back: float = 0.0  # seconds after the last restart until every agent was connected
    violations: list[str] = field(default_factory=list)

    def summary(self, ledger: Ledger, storm: Storm) -> dict[str, Any]:
        bounds = sorted(k.to_serving for k in self.kills)
        return {
            "kills": len(self.kills),
            "requests": ledger.requests,
            "in_flight_at_kills": sum(k.in_flight for k in self.kills),
            "in_flight_max": max((k.in_flight for k in self.kills), default=0),
            "lost_replies": ledger.lost_replies,
            "retried_503": ledger.retried_503,
            "certificates_checked": self.checked.certificates,
            "recorded_not_received": self.checked.unreceived,
            "told_used_after_lost_reply": len(ledger.lost_then_used),
            "agents": len(storm.agents),
            "agents_on_killed_nodes": sum(k.agents_on for k in self.kills),
            "agent_renewals": sum(a.renewals for a in storm.agents),
            "agent_reconnects": storm.agent_events["connected"],
            "agents_back_s": round(self.agents_back, 2),
            "restart_to_serving_p50_s": round(bounds[len(bounds) // 2], 2) if bounds else None,
            "restart_to_serving_max_s": round(bounds[-1], 2) if bounds else None,
            "violations": len(self.violations),
        }


def run_campaign(
    nodes: Sequence[Node],
    work: Path,
    config: StormConfig,
    *,
    kills: int,
    seed: int,
    gap: tuple[float, float] = (0.3, 1.5),
    restart: bool = True,
    serving_timeout: float = 60,
    agents_timeout: float = 60,
    wait_agents_each: bool = False,
    agents_first: bool = False,
    victim: Callable[[list[Node], Storm], Node] | None = None,
    progress: Any = None,
) -> tuple[Campaign, Storm]:
    """Start `nodes` (their homes made, not yet served), storm them, kill one at random after a
    random `gap` `kills` times (restarting it unless not `restart`), check after each restart
    and at the end. `wait_agents_each`: after each restart, also wait until every agent is
    connected again (and time it) before the next gap. `agents_first`: wait until every agent
    is connected before the first gap. `victim(up_nodes, storm)` picks the node to kill
    (default: one at random). The nodes are left running; the caller stops them."""
    storm = Storm(nodes, work, config, seed)
    campaign = Campaign()
    rng = random.Random(seed)
    storm.mint()
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_serving(serving_timeout)
    storm.enroll_renewers()
    storm.start()
    try:
        if agents_first and storm.agents:
            storm.wait_agents(agents_timeout)
        for k in range(kills):
            after = rng.uniform(*gap)
            time.sleep(after)
            up = [x for x in nodes if x.proc is not None and x.proc.poll() is None]
            if not up:
                codes = {x.name: x.proc and x.proc.returncode for x in nodes}
                raise RuntimeError(f"no node running (exit codes {codes}), see {nodes[0].log}")
            node = victim(up, storm) if victim is not None else rng.choice(up)
            in_flight = storm.ledger.in_flight
            agents_on = len(storm.agents_on(node))
            killed, killed_at = time.monotonic(), datetime.now(UTC)
            node.kill()
            back = None
            if wait_agents_each and storm.agents and len(nodes) > 1:
                # Several nodes: the agents move to the others, before any restart.
                storm.wait_agents(agents_timeout)
                back = time.monotonic() - killed
            to_serving = 0.0
            if restart:
                node.start()
                node.wait_serving(serving_timeout)
                to_serving = time.monotonic() - killed
            if wait_agents_each and storm.agents and len(nodes) == 1:
                storm.wait_agents(agents_timeout, connected_after=killed_at)
                back = time.monotonic() - killed
            campaign.kills.append(Kill(node.name, after, in_flight, to_serving, back, agents_on))
            checked = check(nodes[0].home, storm.ledger, final=False)
            campaign.violations += [f"after kill {k + 1}: {v}" for v in checked.violations]
            if progress is not None:
                progress(k + 1, campaign.kills[-1], storm.ledger)
        # Agents carry on by themselves: connected again (to a node that is up).
        if storm.agents and campaign.kills:
            campaign.agents_back = storm.wait_agents(
                agents_timeout, connected_after=_alone(nodes, killed_at)
            )
    finally:
        storm.finish()
    campaign.checked = check(nodes[0].home, storm.ledger, final=True)
    campaign.violations += storm.ledger.violations + campaign.checked.violations
    return campaign, storm


def _alone(nodes: Sequence[Node], killed_at: datetime) -> datetime | None:
    """With one node, every agent was cut off by the kill: it must connect again after it."""
    return killed_at if len(nodes) == 1 else None


def make_nodes(
    work: Path,
    count: int = 1,
    *,
    registry: str | None = None,
    registry_password: str | None = None,
    device_validity: timedelta = timedelta(minutes=5),
) -> list[Node]:
    """A home (`fleetpki init` in-process; SQLite, or `registry` = a PostgreSQL URL without its
    password) and, for more nodes, `fleetpki node add` homes of their own; not yet started.
    Device certificates last `device_validity`, backdated 1 s (the bench makes it short, so
    that agents renew during the campaign; the suite keeps it longer than any restart on a
    loaded machine, so that no agent's certificate runs out while its node is down)."""
    from typer.testing import CliRunner

    from enroll_server.cli.app import app
    from tests.live_server import make_home

    config: dict[str, Any] = {"device_validity": device_validity, "backdate": timedelta(seconds=1)}
    if registry is not None:
        config["registry"] = registry
    make_home(work / "home-a", registry_password=registry_password, **config)
    homes = [work / "home-a"]
    for i in range(1, count):
        home = work / f"home-{chr(ord('a') + i)}"
        result = CliRunner().invoke(
            app,
            ["node", "add", "--home", str(homes[0]), "--out", str(home),
             "--hostname", "localhost", "--hostname", "127.0.0.1"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        homes.append(home)
    return [Node(home.name[-1], home, work / f"serve-{home.name[-1]}.log") for home in homes]
