"""Issue 18, campaign 2: kill -9 of operator commands at random moments, shared by the suite
(tests/integration/test_kill_cli.py, a few kills) and the long form (bench/faults_kill_cli.py).

Each command runs as a real `python -m enroll_server.cli` subprocess against a real home
(`fleetpki init`) while a real `fleetpki serve` (EST, CRL/OCSP, broker) runs on it. Its normal
run time is measured first; each kill comes after a delay drawn from its own slice of that time
(so the kills spread over the whole run, start-up included), with SIGKILL. After every kill the
state is checked, then the same command is run again and the state checked once more:

- `batch create --out DIR`: the registry has the batch with all its devices and tokens, or no
  row of it; DIR holds every bundle (agent.toml, ca.pem, token, all 0600; token = the one the
  registry hashed) and the manifest, or does not exist. In between only one state is allowed:
  the batch registered and its complete bundles in a hidden staging folder (killed between the
  commit and the rename), which the rerun publishes. The rerun ends with the batch complete
  and no staging folder left.
- `device revoke`: the device revoked with its certificate, audit row and event, its serial on
  the CRL, OCSP `revoked` and its live broker session dropped; or all of it untouched (the
  session alive). The rerun revokes it completely.
- `batch revoke`: resumable by design (chunks of 500 devices, one transaction each, so that a
  lot of 100,000 does not hold the registry's write lock for minutes): each device is revoked
  completely or untouched, the batch's `batch.revoke` audit row only once every device is; the
  rerun revokes the rest.
- `server-cert renew`: tls/server.key is the key of tls/server.pem at every moment (an
  ssl.SSLContext loads the pair; the running server keeps answering); the rerun renews.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import HomeLayout, hash_secret, new_secret, registry_location
from enroll_server.home.server_certificate import ServerCertificateError, read_pair
from enroll_server.pki.keys import KeyType, generate_key, private_key_pem
from enroll_server.registry import NewDevice, Registry
from fleetpki.identity import DeviceId
from tests.est_client import ask_ocsp, enroll_headers, request
from tests.pki_helpers import csr_der, make_csr

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("batch create", "device revoke", "batch revoke", "server-cert renew")
# How long a revocation may take to reach the running server's CRL and broker.
PROPAGATION_S = 20.0
BUNDLE_FILES = {"agent.toml", "ca.pem", "token"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "enroll_server.cli", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


Check = Callable[[], tuple[str, list[str]]]
RerunOk = Callable[[str, subprocess.CompletedProcess[str], str], bool]


def completed(_: str, again: subprocess.CompletedProcess[str], after: str) -> bool:
    return again.returncode == 0 and after == "complete"


@dataclass
class Tally:
    """What happened to one command over a campaign."""

    command: str
    duration_s: float = 0.0
    kills: int = 0
    killed_running: int = 0  # still running when SIGKILL came (the rest had already ended)
    states: Counter[str] = field(default_factory=Counter)  # after the kill
    reruns: int = 0
    violations: list[str] = field(default_factory=list)

    def round(
        self, i: int, delay: float, argv: list[str], cwd: Path, check: Check, rerun_ok: RerunOk
    ) -> None:
        """One kill: run `argv`, SIGKILL it after `delay`, `check()` the state (a state name
        and the problems found), run it again, `check()` again: `rerun_ok(state after the
        kill, the rerun, state after it)` says whether the rerun completed the job."""
        self.kills += 1
        self.killed_running += kill_after(argv, delay, cwd)
        state, problems = check()
        self.states[state] += 1
        self.violations += [f"kill {i} at {delay:.3f}s: {p}" for p in problems]
        again = run_cli(argv, cwd)
        after, problems = check()
        if not problems and rerun_ok(state, again, after):
            self.reruns += 1
        else:
            self.violations.append(
                f"rerun {i}: exit {again.returncode} {again.stderr.strip()[:200]!r}, "
                f"{after} {problems[:3]}"
            )

    def to_json(self) -> dict[str, object]:
        return {
            "command": self.command,
            "normal_run_s": round(self.duration_s, 3),
            "kills": self.kills,
            "killed_while_running": self.killed_running,
            "states_after_kill": dict(self.states),
            "reruns_completed": self.reruns,
            "violations": self.violations,
        }


def kill_after(argv: list[str], delay: float, cwd: Path) -> bool:
    """Run `argv`, SIGKILL it `delay` seconds in; True if it was still running then."""
    proc = subprocess.Popen(
        argv, cwd=cwd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return True


def run_cli(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def timed(argv: list[str], cwd: Path) -> float:
    started = time.monotonic()
    done = run_cli(argv, cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{argv}: exit {done.returncode}: {done.stderr}")
    return time.monotonic() - started


def spread(duration: float, kills: int, rng: random.Random) -> list[float]:
    """One delay in each of `kills` equal slices of [0, 1.1 x duration), shuffled."""
    span = duration * 1.1
    delays = [span * (i + rng.random()) / kills for i in range(kills)]
    rng.shuffle(delays)
    return delays


def read_only(layout: HomeLayout) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{layout.registry}?mode=ro", uri=True)


def eventually(check: Callable[[], bool], seconds: float = PROPAGATION_S) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


# ------------------------------------------------------------------------------ the server


@dataclass
class Served:
    """`fleetpki serve` on a fresh home, every port ephemeral on 127.0.0.1."""

    home: Path
    proc: subprocess.Popen[bytes]
    est_url: str
    http_url: str
    mqtt_port: int
    log: Path

    @property
    def layout(self) -> HomeLayout:
        return HomeLayout(self.home)

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.layout.root_cert))

    def db(self) -> sqlite3.Connection:
        return read_only(self.layout)

    def registry(self) -> Registry:
        return Registry.open(registry_location(self.layout))

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def served_home(folder: Path) -> Iterator[Served]:
    home = folder / "home"
    done = run_cli(cli("init", "--home", str(home)), folder)
    if done.returncode != 0:
        raise RuntimeError(f"fleetpki init: {done.stderr}")
    log = folder / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cli("serve", "--home", str(home), "--est-port", "0", "--http-port", "0",
                "--admin-port", "0", "--mqtt-port", "0"),
            cwd=folder, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        urls: list[str] = []
        mqtt = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (urls and mqtt) and proc.poll() is None:
            text = log.read_text(errors="replace")
            if m := re.search(r"MQTT broker \(mTLS\) listening on [^:]+:(\d+)", text):
                mqtt = int(m.group(1))
            if m := re.search(r"EST on .*", text):
                urls = re.findall(r"https?://127\.0\.0\.1:\d+", m.group(0))
            time.sleep(0.1)
        if not (urls and mqtt):
            raise RuntimeError(f"fleetpki serve did not start: {log.read_text()[-2000:]}")
        yield Served(home, proc, urls[0], urls[1], mqtt, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Device:
    device_id: str
    cert: x509.Certificate
    cert_file: Path
    key_file: Path


def enroll(served: Served, folder: Path, device_id: str, token: str) -> Device:
    """EST simpleenroll (RFC 7030 4.2.1) with the device's one-time token."""
    key = generate_key(KeyType.EC_P256)
    body = base64.b64encode(csr_der(make_csr(key, device_id)))
    for _ in range(5):
        reply = request(
            served.est_url + "/.well-known/est/simpleenroll", served.client_ssl(), "POST", body,
            enroll_headers(device_id, token),
        )  # fmt: skip
        if reply.status != 503:
            break
        # Busy (the registry's write lock held by another process): as an agent, retry.
        time.sleep(float(reply.headers.get("retry-after", "1")))
    if reply.status != 200:
        raise RuntimeError(f"enroll {device_id}: {reply.status} {reply.text}")
    (cert,) = [
        c
        for c in decode_certs_only(reply.body)
        if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ]
    cert_file, key_file = folder / f"{device_id}.pem", folder / f"{device_id}.key"
    issuing = served.layout.issuing_cert.read_bytes()
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + issuing)
    key_file.write_bytes(private_key_pem(key, None))
    key_file.chmod(0o600)
    return Device(device_id, cert, cert_file, key_file)


def provision(served: Served, device_ids: list[str], batch_id: str | None) -> dict[str, str]:
    """Register devices (as a batch if `batch_id`) with fresh tokens; {device id: token}."""
    now = datetime.now(UTC)
    tokens = {d: new_secret() for d in device_ids}
    with served.registry() as registry:
        if batch_id is not None:
            registry.create_batch(
                batch_id, (NewDevice(DeviceId(d), hash_secret(t)) for d, t in tokens.items()),
                kind="token", token_ttl=timedelta(days=7), now=now, actor="test",
            )  # fmt: skip
        else:
            for d, t in tokens.items():
                registry.add_device(DeviceId(d), batch_id=None, now=now, actor="test")
                registry.add_token(DeviceId(d), hash_secret(t), now + timedelta(days=7), now)
    return tokens


class Session:
    """A live MQTT 3.1.1 session over mTLS with a device certificate (CONNECT by hand)."""

    def __init__(self, served: Served, device: Device) -> None:
        ctx = ssl.create_default_context(cafile=str(served.layout.root_cert))
        ctx.load_cert_chain(device.cert_file, device.key_file)
        raw = socket.create_connection(("127.0.0.1", served.mqtt_port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        client = device.device_id.encode()
        var = b"\x00\x04MQTT\x04\x02\x00\x3c"
        body = var + len(client).to_bytes(2, "big") + client
        self.sock.sendall(bytes([0x10, len(body)]) + body)
        connack = self._read(4)
        if connack != b"\x20\x02\x00\x00":
            raise RuntimeError(f"CONNACK {connack!r}")

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def alive(self) -> bool:
        """PINGREQ answered by PINGRESP (MQTT 3.1.1 3.12, 3.13)."""
        try:
            self.sock.sendall(b"\xc0\x00")
            return self._read(2) == b"\xd0\x00"
        except OSError:
            return False

    def dropped(self) -> bool:
        try:
            self.sock.settimeout(0.2)
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(10)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def crl_serials(served: Served) -> set[int]:
    crl = x509.load_der_x509_crl(request(served.http_url + "/crl", None).body)
    return {entry.serial_number for entry in crl}


def ocsp_status(served: Served, cert: x509.Certificate) -> ocsp.OCSPCertStatus:
    issuer = x509.load_pem_x509_certificate(served.layout.issuing_cert.read_bytes())
    return ask_ocsp(served.http_url, cert, issuer).certificate_status


# ------------------------------------------------------------------------------ batch create


def bundle_problems(layout: HomeLayout, out: Path, batch_id: str, count: int) -> list[str]:
    """Why DIR is not the complete, consistent output of `batch_id` (empty: it is)."""
    problems = []
    with read_only(layout) as db:
        hashes = dict(
            db.execute(
                "SELECT d.id, t.token_hash FROM devices d JOIN tokens t ON t.device_id = d.id "
                "WHERE d.batch_id = ?",
                (batch_id,),
            ).fetchall()
        )
    if len(hashes) != count:
        problems.append(f"{len(hashes)} devices with tokens registered, not {count}")
    manifest = out / "manifest.csv"
    if not manifest.is_file():
        return [*problems, f"{manifest} missing"]
    rows = manifest.read_text().splitlines()[1:]
    ids = [r.split(",")[0] for r in rows]
    if sorted(ids) != sorted(hashes):
        problems.append(f"manifest lists {len(ids)} ids, registry {len(hashes)}")
    for device_id, token_hash in hashes.items():
        folder = out / device_id
        if not folder.is_dir() or folder.stat().st_mode & 0o777 != 0o700:
            problems.append(f"{folder}: missing or not 0700")
            continue
        names = {p.name for p in folder.iterdir()}
        if names != BUNDLE_FILES:
            problems.append(f"{folder}: holds {sorted(names)}")
            continue
        for p in folder.iterdir():
            if p.stat().st_mode & 0o777 != 0o600:
                problems.append(f"{p}: mode {p.stat().st_mode & 0o777:o}")
        token = (folder / "token").read_text().strip()
        if hashlib.sha256(token.encode()).hexdigest() != token_hash:
            problems.append(f"{folder}/token is not the registered token")
        if f'id = "{device_id}"' not in (folder / "agent.toml").read_text():
            problems.append(f"{folder}/agent.toml names another device")
    return problems


def _batches_of(served: Served, prefix: str) -> list[str]:
    with served.db() as db:
        return [
            r[0]
            for r in db.execute(
                "SELECT DISTINCT batch_id FROM devices WHERE id LIKE ? || '%'", (prefix,)
            ).fetchall()
        ]


def staging_of(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _batch_create_state(served: Served, out: Path, prefix: str, count: int) -> tuple[str, list]:
    batches = _batches_of(served, prefix)
    if not batches:
        if out.exists() and any(out.iterdir()):
            return "violation", [f"no batch registered, but {out} holds files"]
        return "nothing", []
    if len(batches) > 1:
        return "violation", [f"{len(batches)} batches for one command: {batches}"]
    (batch_id,) = batches
    if out.exists():
        problems = bundle_problems(served.layout, out, batch_id, count)
        return ("complete", []) if not problems else ("violation", problems[:5])
    staged = staging_of(out)
    if len(staged) == 1:
        problems = [
            p for p in bundle_problems(served.layout, staged[0], batch_id, count)
            if "/token is not" in p or "manifest" in p
        ]  # fmt: skip
        if not problems:
            return "resumable", []
    return "violation", [f"batch {batch_id} registered, {out} missing, staging {staged}"]


def kill_batch_create(
    served: Served, work: Path, kills: int, rng: random.Random, count: int
) -> Tally:
    tally = Tally("batch create")

    def argv(i: int) -> list[str]:
        return cli("batch", "create", "--home", str(served.home), "--count", str(count),
                   "--prefix", f"k{i}-", "--out", str(work / f"lot{i}"))  # fmt: skip

    tally.duration_s = timed(argv(0), work)
    for i, delay in enumerate(spread(tally.duration_s, kills, rng), start=1):
        out, prefix = work / f"lot{i}", f"k{i}-"

        def check(out: Path = out, prefix: str = prefix) -> tuple[str, list[str]]:
            state, problems = _batch_create_state(served, out, prefix, count)
            if state == "complete" and staging_of(out):
                return "violation", [f"staging folders left: {staging_of(out)}"]
            return state, problems

        def rerun_ok(state: str, again: subprocess.CompletedProcess[str], after: str) -> bool:
            # Finished already: refusing a folder that holds it is the right answer too.
            done = state == "complete" and again.returncode == 2 and "not empty" in again.stderr
            return (again.returncode == 0 or done) and after == "complete"

        tally.round(i, delay, argv(i), work, check, rerun_ok)
    return tally


# ------------------------------------------------------------------------------ device revoke


def _device_revoke_state(served: Served, device: Device, session: Session) -> tuple[str, list]:
    serial_hex = f"{device.cert.serial_number:x}"
    with served.db() as db:
        (state,) = db.execute(
            "SELECT state FROM devices WHERE id = ?", (device.device_id,)
        ).fetchone()
        (status,) = db.execute(
            "SELECT status FROM certificates WHERE device_id = ? AND serial = ?",
            (device.device_id, serial_hex),
        ).fetchone()
        (audits,) = db.execute(
            "SELECT count(*) FROM audit WHERE device_id = ? AND action = 'device.revoke'",
            (device.device_id,),
        ).fetchone()
        (events,) = db.execute(
            "SELECT count(*) FROM events WHERE device_id = ? AND kind = 'revoked'",
            (device.device_id,),
        ).fetchone()
    serial = device.cert.serial_number
    if (state, status, bool(audits), bool(events)) == ("revoked", "revoked", True, True):
        problems = []
        if not eventually(lambda: serial in crl_serials(served)):
            problems.append(f"serial {serial_hex} not on the CRL")
        if ocsp_status(served, device.cert) != ocsp.OCSPCertStatus.REVOKED:
            problems.append("OCSP does not say revoked")
        if not eventually(session.dropped):
            problems.append("live broker session not dropped")
        return ("complete", []) if not problems else ("violation", problems)
    if (state, status, audits, events) == ("active", "active", 0, 0):
        problems = []
        if serial in crl_serials(served):
            problems.append("untouched, yet on the CRL")
        if ocsp_status(served, device.cert) != ocsp.OCSPCertStatus.GOOD:
            problems.append("untouched, yet OCSP not good")
        if not session.alive():
            problems.append("untouched, yet its broker session is gone")
        return ("nothing", []) if not problems else ("violation", problems)
    return "violation", [f"half revoked: {state=} {status=} {audits=} {events=}"]


def kill_device_revoke(served: Served, work: Path, kills: int, rng: random.Random) -> Tally:
    tally = Tally("device revoke")
    creds = work / "device-creds"
    creds.mkdir(exist_ok=True)
    names = [f"r{i}" for i in range(kills + 1)]
    tokens = provision(served, names, None)

    def argv(name: str) -> list[str]:
        return cli(
            "device", "revoke", name, "--home", str(served.home), "--reason", "keyCompromise"
        )

    enroll(served, creds, names[0], tokens[names[0]])
    tally.duration_s = timed(argv(names[0]), work)
    for i, delay in enumerate(spread(tally.duration_s, kills, rng), start=1):
        device = enroll(served, creds, names[i], tokens[names[i]])
        session = Session(served, device)
        try:
            tally.round(
                i, delay, argv(device.device_id), work,
                partial(_device_revoke_state, served, device, session), completed,
            )  # fmt: skip
        finally:
            session.close()
    return tally


# ------------------------------------------------------------------------------ batch revoke


def _batch_revoke_state(
    served: Served, batch_id: str, size: int, enrolled: list[Device]
) -> tuple[str, list]:
    with served.db() as db:
        states = Counter(
            dict(db.execute(
                "SELECT state, count(*) FROM devices WHERE batch_id = ? GROUP BY state", (batch_id,)
            ).fetchall())
        )  # fmt: skip
        (audited,) = db.execute(
            "SELECT count(DISTINCT a.device_id) FROM audit a JOIN devices d ON d.id = a.device_id "
            "WHERE d.batch_id = ? AND a.action = 'device.revoke'",
            (batch_id,),
        ).fetchone()
        (evented,) = db.execute(
            "SELECT count(DISTINCT e.device_id) FROM events e JOIN devices d ON d.id = e.device_id "
            "WHERE d.batch_id = ? AND e.kind = 'revoked'",
            (batch_id,),
        ).fetchone()
        (finished,) = db.execute(
            "SELECT count(*) FROM audit WHERE action = 'batch.revoke' "
            "AND json_extract(detail, '$.batch_id') = ?",
            (batch_id,),
        ).fetchone()
        half = db.execute(
            "SELECT count(*) FROM certificates c JOIN devices d ON d.id = c.device_id "
            "WHERE d.batch_id = ? AND (d.state = 'revoked') != (c.status = 'revoked')",
            (batch_id,),
        ).fetchone()[0]
    revoked = states["revoked"]
    problems = []
    if sum(states.values()) != size:
        problems.append(f"{sum(states.values())} devices, not {size}")
    if audited != revoked or evented != revoked:
        problems.append(f"{revoked} revoked, {audited} with an audit row, {evented} with an event")
    if half:
        problems.append(f"{half} certificates whose status disagrees with their device's")
    if finished and revoked != size:
        problems.append(f"batch.revoke recorded with {size - revoked} devices not revoked")
    if revoked == size:
        on_crl = crl_serials(served)
        if not eventually(
            lambda: all(d.cert.serial_number in crl_serials(served) for d in enrolled)
        ):
            problems.append(f"enrolled serials missing from the CRL ({len(on_crl)} listed)")
    if problems:
        return "violation", problems
    if revoked == size:
        return ("complete" if finished else "all revoked, not yet recorded"), []
    return ("nothing" if revoked == 0 else "resumable"), []


def kill_batch_revoke(
    served: Served, work: Path, kills: int, rng: random.Random, size: int
) -> Tally:
    tally = Tally("batch revoke")
    creds = work / "batch-creds"
    creds.mkdir(exist_ok=True)

    def lot(i: int) -> tuple[str, list[Device]]:
        batch_id = f"rv{i}"
        tokens = provision(served, [f"rv{i}-{n:06d}" for n in range(size)], batch_id)
        enrolled = [enroll(served, creds, d, tokens[d]) for d in list(tokens)[:: max(1, size // 3)]]
        return batch_id, enrolled

    def argv(batch_id: str) -> list[str]:
        return cli("batch", "revoke", batch_id, "--home", str(served.home), "--reason",
                   "keyCompromise", "--yes")  # fmt: skip

    tally.duration_s = timed(argv(lot(0)[0]), work)
    for i, delay in enumerate(spread(tally.duration_s, kills, rng), start=1):
        batch_id, enrolled = lot(i)
        check = partial(_batch_revoke_state, served, batch_id, size, enrolled)
        tally.round(i, delay, argv(batch_id), work, check, completed)
    return tally


# ------------------------------------------------------------------------------ server-cert renew


def _pair_state(served: Served) -> tuple[int | None, list[str]]:
    """The serial of the pair on disk if key and certificate match and TLS loads them."""
    layout = served.layout
    try:
        _, _, leaf = read_pair(layout.server_cert, layout.server_key)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            layout.server_cert, layout.server_key
        )
    except (ServerCertificateError, ssl.SSLError, OSError) as exc:
        return None, [f"the pair on disk does not load: {exc}"]
    problems = []
    if layout.server_key.stat().st_mode & 0o777 != 0o600:
        problems.append("server.key is not 0600")
    try:
        request(served.est_url + "/.well-known/est/cacerts", served.client_ssl(), timeout=10)
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"the running server's TLS fails: {exc}")
    return leaf.serial_number, problems


def kill_server_cert_renew(served: Served, work: Path, kills: int, rng: random.Random) -> Tally:
    tally = Tally("server-cert renew")
    argv = cli("server-cert", "renew", "--home", str(served.home))
    tally.duration_s = timed(argv, work)
    for i, delay in enumerate(spread(tally.duration_s, kills, rng), start=1):
        before, _ = _pair_state(served)

        def check(before: int | None = before) -> tuple[str, list[str]]:
            serial, problems = _pair_state(served)
            return ("nothing" if serial == before else "renewed"), problems

        def rerun_ok(state: str, again: subprocess.CompletedProcess[str], after: str) -> bool:
            return again.returncode == 0 and after == "renewed"

        tally.round(i, delay, argv, work, check, rerun_ok)
    return tally


# ------------------------------------------------------------------------------ a campaign


def campaign(
    kills: int,
    *,
    seed: int = 18,
    batch_size: int = 200,
    revoke_size: int = 1200,
    commands: tuple[str, ...] = COMMANDS,
    folder: Path | None = None,
) -> list[Tally]:
    """`kills` kills of each command on one served home; the tallies, in COMMANDS order."""
    rng = random.Random(seed)
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kill-cli-")))
        served = stack.enter_context(served_home(folder))
        work = folder / "work"
        work.mkdir()
        tallies = []
        runs: dict[str, Callable[[], Tally]] = {
            "batch create": lambda: kill_batch_create(served, work, kills, rng, batch_size),
            "device revoke": lambda: kill_device_revoke(served, work, kills, rng),
            "batch revoke": lambda: kill_batch_revoke(served, work, kills, rng, revoke_size),
            "server-cert renew": lambda: kill_server_cert_renew(served, work, kills, rng),
        }
        for command in commands:
            tallies.append(runs[command]())
            if not served.alive():
                tail = served.log.read_text(errors="replace")[-3000:]
                tallies[-1].violations.append(f"fleetpki serve died: {tail}")
                break
        return tallies


def report(tallies: list[Tally]) -> str:
    return json.dumps([t.to_json() for t in tallies], indent=2)
