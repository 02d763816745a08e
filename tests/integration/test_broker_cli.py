"""`fleetpki broker --home H`: the broker alone, in its own process (on uvloop, as the CLI runs it),
on a real home folder; revocation by the operator CLI from yet another process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography import x509

from enroll_server.pki.keys import load_private_key_pem
from tests.integration.broker_harness import (
    PAHO_ACCEPTED,
    PAHO_NOT_AUTHORIZED,
    Creds,
    PahoDevice,
    eventually,
)

FLEETPKI = str(Path(sys.executable).with_name("fleetpki"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _run(*args: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        FLEETPKI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_standalone_broker_serves_a_home_folder(tmp_path: Path):
    home = tmp_path / "home"
    env = {**os.environ, "FLEETPKI_CA_PASSPHRASE": "test-passphrase-0123456789"}
    await _run("init", "--home", str(home), env=env)
    await _run("service", "issue", "backend", "--home", str(home), env=env)
    metrics_port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        FLEETPKI, "broker", "--home", str(home), "--mqtt-port", "0",
        "--metrics-port", str(metrics_port),
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        port = None
        async with asyncio.timeout(30):
            while port is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "broker exited before listening"
                found = re.search(r"MQTT \(mTLS\) on [\d.]+:(\d+)", line)
                port = int(found.group(1)) if found else None
        folder = home / "services" / "backend"
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        key = load_private_key_pem((folder / "key.pem").read_bytes(), None, "service key")
        creds = Creds("backend", cert, key, folder / "cert.pem", folder / "key.pem")
        svc = PahoDevice(creds, port, folder / "ca.pem")
        assert await svc.connect() == PAHO_ACCEPTED
        assert await svc.subscribe("devices/+/telemetry") == [1]
        # Metrics: HTTPS with the server certificate (verified against the root) and an
        # operator's bearer token, as on `fleetpki serve`'s admin listener.
        url = f"https://127.0.0.1:{metrics_port}/metrics"
        tls = ssl.create_default_context(cafile=str(home / "ca" / "root.pem"))
        token = (home / "admin.token").read_text().strip()

        def get(headers: dict[str, str]) -> tuple[int, str, str]:
            req = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(req, None, 5, context=tls) as r:
                    return r.status, r.read().decode(), ""
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode(), e.headers.get("WWW-Authenticate", "")

        status, text, challenge = await asyncio.to_thread(get, {})
        assert status == 401 and challenge.startswith("Bearer ") and "fleetpki_" not in text
        status, text, _ = await asyncio.to_thread(get, {"Authorization": "Bearer wrong"})
        assert status == 401 and "fleetpki_" not in text
        status, text, _ = await asyncio.to_thread(get, {"Authorization": f"Bearer {token}"})
        assert status == 200
        assert 'fleetpki_broker_connected_clients{role="service"} 1' in text
        # Revoked by another process (the operator CLI): the live session ends within 1 s of
        # that process' commit, i.e. of its exit.
        await _run("device", "revoke", "backend", "--home", str(home), env=env)
        revoked_at = time.monotonic()
        await eventually(lambda: svc.disconnects, 2.0, "the revoked service to be dropped")
        assert time.monotonic() - revoked_at < 1.0
        await svc.close()
        again = PahoDevice(creds, port, folder / "ca.pem")
        assert await again.connect() == PAHO_NOT_AUTHORIZED
        await again.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await proc.wait()
    assert proc.returncode == 0


async def test_broker_without_home_fails_clearly(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "FLEETPKI_HOME"}
    proc = await asyncio.create_subprocess_exec(
        FLEETPKI, "broker", "--home", str(tmp_path / "nothing"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 2
    assert "not initialized" in out.decode()
