"""Helpers for the CA lifecycle tests: the `fleetpki` CLI and `fleetpki serve` as processes,
a device enrolled from its bundle, and `openssl verify` on what it got."""

from __future__ import annotations

import base64
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import KeyType, generate_key, private_key_pem
from tests.est_client import Reply, enroll_headers, request
from tests.pki_helpers import csr_der, make_csr

EST = "/.well-known/est"
REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without FLEETPKI_* (a home, passphrases), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPKI_")}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def fleetpki(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=env or clean_env(),
        check=False,
    )


@dataclass
class Served:
    proc: subprocess.Popen[str]
    est_url: str
    http_url: str
    lines: list[str]


@contextmanager
def serving(home: Path, env: dict[str, str] | None = None) -> Iterator[Served]:
    """`fleetpki serve --home H` (no broker) on free loopback ports, stopped with SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(home),
         "--est-port", "0", "--http-port", "0", "--admin-port", "0", "--no-broker"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or clean_env(),
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        urls: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "fleetpki.server: EST on" in line:
                urls = re.findall(r"https?://127\.0\.0\.1:\d+", line)
                break
        assert urls, f"serve did not start: {''.join(lines)}"
        yield Served(proc, urls[0], urls[1], lines)
        assert proc.poll() is None, "serve ended by itself"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


@dataclass
class Enrolled:
    cert: x509.Certificate
    cert_path: Path
    key_path: Path
    ca_pem: Path  # the bundle's trust anchor
    cacerts: list[x509.Certificate]  # /cacerts


def enroll_from_bundle(server: Served, home: Path, out: Path, env: dict[str, str]) -> Enrolled:
    """`fleetpki batch create --count 1`, then the device enrolls as its bundle says: EST over
    TLS verified with the bundle's ca.pem only, HTTP Basic with its one-time token."""
    made = fleetpki("batch", "create", "--home", str(home), "--count", "1", "--out", str(out),
                    env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    device, token = folder.name, (folder / "token").read_text().strip()
    ctx = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    key = generate_key(KeyType.EC_P256)
    body = base64.b64encode(csr_der(make_csr(key, device)))
    reply: Reply = request(
        server.est_url + EST + "/simpleenroll", ctx, "POST", body, enroll_headers(device, token)
    )
    assert reply.status == 200, (reply.status, reply.text)
    (cert,) = [
        c
        for c in decode_certs_only(reply.body)
        if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ]
    cacerts = decode_certs_only(request(server.est_url + EST + "/cacerts", ctx).body)
    cert_path, key_path = out / "device.pem", out / "device.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_key_pem(key, None))
    return Enrolled(cert, cert_path, key_path, folder / "ca.pem", list(cacerts))


def write_pem(path: Path, certs: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def openssl_verify(
    anchor: Path, leaf: Path, untrusted: Path | None = None, *crl_files: Path
) -> subprocess.CompletedProcess[str]:
    """`openssl verify -CAfile anchor [-untrusted U] [-crl_check_all -CRLfile ...] leaf`."""
    args = ["openssl", "verify", "-CAfile", str(anchor)]
    if untrusted is not None:
        args += ["-untrusted", str(untrusted)]
    if crl_files:
        args.append("-crl_check_all")
        for crl in crl_files:
            args += ["-CRLfile", str(crl)]
    return subprocess.run([*args, str(leaf)], capture_output=True, text=True, timeout=30)


def home_snapshot(home: Path) -> dict[str, bytes]:
    """Every file under the home (but the registry, which SQLite touches) and its bytes."""
    return {
        str(p.relative_to(home)): p.read_bytes()
        for p in sorted(home.rglob("*"))
        if p.is_file() and not p.name.startswith("registry.db")
    }
