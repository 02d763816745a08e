"""The README's EST example, run as written (openssl, curl, mosquitto_pub) against a real
server and its embedded broker; the device certificate it produces then authenticates mTLS."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tests.live_server import LiveServer

REPO = Path(__file__).resolve().parents[2]
DEVICE = "pi-000001"  # the id the README uses


def readme_est_example() -> str:
    """The shell block that follows "Any EST client works" in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    at = text.index("Any EST client works")
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, at)
    assert match is not None, "README: no ```sh block after 'Any EST client works'"
    return match.group(1)


def for_this_server(script: str, server: LiveServer) -> str:
    """Only the host and ports change: the README names a LAN host and the default ports."""
    assert script.count("broker.example.lan:8443") == 1
    assert script.count("-h broker.example.lan -p 8883") == 1
    return script.replace("broker.example.lan:8443", f"localhost:{server.handle.est_port}").replace(
        "-h broker.example.lan -p 8883", f"-h localhost -p {server.mqtt_port}"
    )


def bundle_folder(server: LiveServer, folder: Path) -> None:
    """A device bundle folder: ca.pem (the root) and the one-time token."""
    (folder / "ca.pem").write_bytes(server.layout.root_cert.read_bytes())
    (folder / "token").write_text(server.mint_device(DEVICE) + "\n")


def run_readme_example(server: LiveServer, folder: Path) -> None:
    script = for_this_server(readme_est_example(), server)
    run = subprocess.run(
        ["bash", "-e", "-u", "-o", "pipefail", "-c", script],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, f"README example failed:\n{run.stdout}\n{run.stderr}"


def test_readme_est_example_yields_a_working_device_certificate(
    live_stack: LiveServer, tmp_path: Path
) -> None:
    bundle_folder(live_stack, tmp_path)
    run_readme_example(live_stack, tmp_path)

    leaf = x509.load_pem_x509_certificates((tmp_path / "dev.pem").read_bytes())
    assert len(leaf) == 1
    cn = leaf[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == DEVICE
    key = serialization.load_pem_private_key((tmp_path / "dev.key").read_bytes(), None)
    assert leaf[0].public_key() == key.public_key()
    chain = x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate(live_stack.layout.issuing_cert.read_bytes())
    assert chain == [issuing]

    # The leaf (with its chain) authenticates TLS on the EST port: the server's handshake
    # verifies it, and openssl reports the client certificate it sent.
    s_client = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"localhost:{live_stack.handle.est_port}",
            "-CAfile",
            "ca.pem",
            "-cert",
            "dev.pem",
            "-key",
            "dev.key",
            "-cert_chain",
            "chain.pem",
            "-verify_return_error",
        ],
        cwd=tmp_path,
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert s_client.returncode == 0, s_client.stderr
    assert "Verify return code: 0 (ok)" in s_client.stdout


def test_readme_mosquitto_pub_reaches_a_subscriber(live_stack: LiveServer, tmp_path: Path) -> None:
    """The block's last line really publishes: a service identity receives the message."""
    from datetime import UTC, datetime

    from enroll_server.enrollment.identities import issue_service_identity

    bundle_folder(live_stack, tmp_path)
    svc = issue_service_identity(live_stack.layout.root, "readme-obs", None, datetime.now(UTC))
    received: list[str] = []
    ready = threading.Event()
    sub = subprocess.Popen(
        [
            "stdbuf",  # line-buffered, so SUBACK shows before the message arrives
            "-oL",
            "mosquitto_sub",
            "--cafile",
            str(live_stack.layout.root_cert),
            "--cert",
            str(svc.cert),
            "--key",
            str(svc.key),
            "-h",
            "localhost",
            "-p",
            str(live_stack.mqtt_port),
            "-i",
            "readme-obs",
            "-t",
            f"devices/{DEVICE}/telemetry",
            "-C",
            "1",
            "-W",
            "60",
            "-d",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert sub.stdout is not None

        def read() -> None:
            assert sub.stdout is not None
            for line in sub.stdout:
                received.append(line)
                if "SUBACK" in line:
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert ready.wait(30), "".join(received)
        run_readme_example(live_stack, tmp_path)
        assert sub.wait(30) == 0, "".join(received)
        reader.join(5)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)
    assert any('{"temp_c": 21.5}' in line for line in received), "".join(received)
