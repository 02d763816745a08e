"""The `fleetpki` CLI as operators run it: init, serve (a real process), device commands."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from enroll_server.cli.app import app
from tests.est_client import request

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_init_creates_hierarchy(tmp_path: Path) -> None:
    home = tmp_path / "h"
    r = runner.invoke(
        app,
        [
            "init",
            "--home",
            str(home),
            "--hostname",
            "broker.lan",
            "--hostname",
            "10.0.0.5",
            "--key-type",
            "ec-p384",
        ],
    )
    assert r.exit_code == 0, r.output
    for secret in (
        "ca/root.key",
        "ca/issuing.key",
        "ca/passphrase",
        "tls/server.key",
        "admin.token",
        "registry.db",
    ):
        assert stat.S_IMODE(os.stat(home / secret).st_mode) == 0o600, secret
    assert b"ENCRYPTED PRIVATE KEY" in (home / "ca/issuing.key").read_bytes()
    token = (home / "admin.token").read_text().strip()
    assert token not in r.output  # the secret itself is never printed
    server = x509.load_pem_x509_certificate((home / "tls/server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.lan" in san.get_values_for_type(x509.DNSName)
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.0.0.5"}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    again = runner.invoke(app, ["init", "--home", str(home)])
    assert again.exit_code == 2 and "already initialized" in again.output


def test_init_rejects_bad_key_type(tmp_path: Path) -> None:
    r = runner.invoke(app, ["init", "--home", str(tmp_path / "h"), "--key-type", "dsa-1024"])
    assert r.exit_code == 2 and "unknown key type 'dsa-1024'" in r.output
    assert not (tmp_path / "h").exists()


def test_passphrase_from_environment(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FLEETPKI_CA_PASSPHRASE", "correct horse battery staple")
    home = tmp_path / "h"
    assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
    assert not (home / "ca/passphrase").exists()
    monkeypatch.setenv("FLEETPKI_CA_PASSPHRASE", "wrong")
    r = runner.invoke(app, ["service", "issue", "backend", "--home", str(home)])
    assert r.exit_code == 2 and "wrong passphrase" in r.output


def test_device_commands(tmp_path: Path) -> None:
    from tests.integration.test_est import enroll
    from tests.live_server import start_live_server

    server = start_live_server(tmp_path / "h")
    try:
        token = server.mint_device("dev-cli")
        assert enroll(server, "dev-cli", token).status == 200
    finally:
        server.stop()
    home = str(tmp_path / "h")
    r = runner.invoke(app, ["device", "list", "--home", home, "--json"])
    assert r.exit_code == 0
    assert [d["state"] for d in json.loads(r.output)] == ["active"]
    r = runner.invoke(
        app, ["device", "revoke", "dev-cli", "--home", home, "--reason", "key-compromise"]
    )
    assert r.exit_code == 0 and "dev-cli: revoked: 1 certificate(s) revoked" in r.output
    shown = json.loads(
        runner.invoke(app, ["device", "show", "dev-cli", "--home", home, "--json"]).output
    )
    assert shown["state"] == "revoked"
    assert shown["certificates"][0]["revocation_reason"] == "keyCompromise"
    r = runner.invoke(app, ["device", "revoke", "nobody", "--home", home])
    assert r.exit_code == 3 and "device nobody is not registered" in r.output
    r = runner.invoke(app, ["device", "revoke", "dev-cli", "--home", home, "--reason", "bored"])
    assert r.exit_code == 2 and "revocation reason" in r.output
    r = runner.invoke(app, ["device", "show", "../etc", "--home", home])
    assert r.exit_code == 2 and "invalid device id" in r.output


def test_service_issue(tmp_path: Path) -> None:
    home = tmp_path / "h"
    assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
    r = runner.invoke(app, ["service", "issue", "backend", "--home", str(home)])
    assert r.exit_code == 0, r.output
    folder = home / "services" / "backend"
    assert stat.S_IMODE(os.stat(folder / "key.pem").st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fleetpki:service:backend"
    ]
    r = runner.invoke(app, ["service", "issue", "backend", "--home", str(home)])
    assert r.exit_code == 2


def test_serve_runs_as_a_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "h"
    assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
    est, http, admin = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enroll_server.cli",
            "serve",
            "--home",
            str(home),
            "--est-port",
            str(est),
            "--http-port",
            str(http),
            "--admin-port",
            str(admin),
            "--no-broker",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if request(f"http://127.0.0.1:{http}/healthz", None, timeout=1).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        import ssl

        ctx = ssl.create_default_context(cafile=str(home / "ca/root.pem"))
        r = request(f"https://localhost:{est}/.well-known/est/cacerts", ctx)
        assert r.status == 200
        # The admin API is on its own listener (loopback), not on the device-facing EST port.
        bearer = {"Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"}
        assert (
            request(f"https://localhost:{admin}/admin/devices", ctx, headers=bearer).status == 200
        )
        assert request(f"https://localhost:{est}/admin/devices", ctx, headers=bearer).status == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert (home / "admin.token").read_text().strip() not in out.decode()


def _fleetpki(*args: str) -> subprocess.CompletedProcess[str]:
    """The real `fleetpki` CLI in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Which listener, which option moves it, and how it names itself in the error.
LISTENERS = {
    "est": ("--est-port", "EST (HTTPS)"),
    "http": ("--http-port", "CRL/OCSP (HTTP)"),
    "mqtt": ("--mqtt-port", "the MQTT broker (mTLS)"),
    "admin": ("--admin-port", "the admin API (HTTPS)"),
}


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 this test listens on (so nothing else can) until the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("taken", list(LISTENERS))
def test_serve_with_a_port_taken_says_which_in_one_line(tmp_path: Path, taken: str) -> None:
    home = tmp_path / "h"
    assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
    with held_port() as busy:
        ports = {option: "0" for option, _ in LISTENERS.values()}
        option, what = LISTENERS[taken]
        ports[option] = str(busy)
        r = _fleetpki("serve", "--home", str(home), *[x for kv in ports.items() for x in kv])
    # One line: what, where, and the option that moves it; no traceback, no log noise.
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: cannot listen for {what} on 127.0.0.1:{busy}: the port is already in use "
        "(another fleetpki serve or broker, or mosquitto?); stop that process or choose "
        f"another port with {option}"
    ], r.stderr
    assert r.stdout == ""


def test_broker_alone_with_its_port_taken_says_so_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "h"
    assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
    with held_port() as busy:
        r = _fleetpki("broker", "--home", str(home), "--mqtt-port", str(busy))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"on 127.0.0.1:{busy}: the port is already in use" in lines[0], lines


@pytest.mark.parametrize("command", ["serve", "init"])
@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_ports_out_of_range_are_refused_at_the_command_line(
    tmp_path: Path, command: str, port: str
) -> None:
    home = tmp_path / "h"
    if command == "serve":
        assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
    r = _fleetpki(command, "--home", str(home), "--est-port", port)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Invalid value for '--est-port'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    if command == "init":
        assert not home.exists()  # nothing half-written that later commands would trip on


def test_init_refuses_port_zero_it_would_write_into_certificates(tmp_path: Path) -> None:
    r = _fleetpki("init", "--home", str(tmp_path / "h"), "--http-port", "0")
    assert r.returncode == 2 and "Invalid value for '--http-port'" in r.stderr, r.stderr
    assert not (tmp_path / "h").exists()
