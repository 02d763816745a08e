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
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import KeyType, PrivateKey, generate_key, private_key_pem
from tests.est_client import Reply, enroll_headers, request
from tests.pki_helpers import csr_der, make_csr

EST = "/.well-known/est"
NOW = datetime.now(UTC)
REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without FLEETPKI_* (a home, passphrases), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPKI_")}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def fleetpki(*args: str, env: dict[str, str] | None = None) -> Ran:
    """The `fleetpki` command in this process (CliRunner: a subprocess costs a second of
    imports), with the FLEETPKI_* variables of `env` (default: none) and no others."""
    from typer.testing import CliRunner

    from enroll_server.cli.app import app

    wanted = {k: v for k, v in (env or {}).items() if k.startswith("FLEETPKI_")}
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FLEETPKI_")}
    result = CliRunner().invoke(app, list(args), env={**unset, **wanted})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


@dataclass
class Served:
    proc: subprocess.Popen[str]
    est_url: str
    http_url: str
    lines: list[str]
    mqtt_port: int | None = None


@contextmanager
def serving(
    home: Path, env: dict[str, str] | None = None, *, broker: bool = False
) -> Iterator[Served]:
    """`fleetpki serve --home H` on free loopback ports (the embedded broker if `broker`),
    stopped with SIGTERM."""
    ports = ["--est-port", "0", "--http-port", "0", "--admin-port", "0", "--mqtt-port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "enroll_server.cli", "serve", "--home", str(home), *ports,
         *([] if broker else ["--no-broker"])],
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
        mqtt = re.findall(r"MQTT broker \(mTLS\) listening on 127\.0\.0\.1:(\d+)", "".join(lines))
        yield Served(proc, urls[0], urls[1], lines, int(mqtt[0]) if mqtt else None)
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


def mqtt_publish(server: Served, device: Enrolled) -> subprocess.CompletedProcess[str]:
    """mosquitto_pub over mTLS to the embedded broker as the device, trusting its ca.pem."""
    assert server.mqtt_port is not None, "serving(..., broker=True)"
    device_id = device.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(server.mqtt_port),
         "--cafile", str(device.ca_pem), "--cert", str(device.cert_path),
         "--key", str(device.key_path), "-i", str(device_id),
         "-t", f"devices/{device_id}/telemetry", "-m", "hello", "-q", "1"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def _other_name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Operator Corp"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def ca_usage(cert_sign: bool = True, crl_sign: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class OtherCa:
    """A CA of another PKI (the operator's), made with cryptography directly."""

    cert: x509.Certificate
    key: PrivateKey


def other_pki_ca(
    subject: str,
    public_key: object,
    issuer: OtherCa | None,
    signing_key: PrivateKey,
    *,
    ca: bool = True,
    path_length: int | None = None,
    usage: x509.KeyUsage | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    cdp: str | None = None,
    ski: bool = True,
    eku: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    """A CA certificate as another PKI would make it (cryptography directly, not fleetpki)."""
    name = _other_name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - timedelta(days=1))
        .not_valid_after(not_after or NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(usage or ca_usage(), critical=True)
    )
    if ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
            critical=False,
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if issuer is not None:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    if cdp is not None:
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [x509.DistributionPoint([x509.UniformResourceIdentifier(cdp)], None, None, None)]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def agent_enroll(server: Served, bundle: Path) -> subprocess.CompletedProcess[str]:
    """`fleetpki-agent enroll` of a device bundle, its EST URL pointed at `server`'s port: the
    real agent, which checks /cacerts and the issued chain against its ca.pem."""
    toml = bundle / "agent.toml"
    text = re.sub(
        r'server = "https://localhost:\d+"', f'server = "{server.est_url}"', toml.read_text()
    )
    toml.write_text(text.replace("https://127.0.0.1:", "https://localhost:"))
    return subprocess.run(
        [sys.executable, "-c", "import sys; from device_agent.cli import main; sys.exit(main())",
         "enroll", "--config", str(toml)],
        capture_output=True, text=True, timeout=60, check=False, env=clean_env(), cwd=bundle,
    )  # fmt: skip
