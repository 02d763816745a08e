"""Enroll exactly as a third-party client would: openssl makes key and CSR, curl posts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.live_server import LiveServer


@pytest.fixture(autouse=True)
def _tools() -> None:
    # .ci/run installs both; a missing tool must fail loudly, not skip.
    assert shutil.which("openssl") and shutil.which("curl"), "openssl and curl are required"


def run(*args: str, cwd: Path, input_: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, cwd=cwd, input=input_, capture_output=True, timeout=30, check=False)


def openssl_csr(name: str, cn: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """A fresh P-256 key (NAME.key) and a DER CSR (NAME.csr) made by openssl, as a device would."""
    return run(
        "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", f"{name}.key", "-subj", f"/CN={cn}", "-outform", "DER",
        "-out", f"{name}.csr", cwd=cwd,
    )  # fmt: skip


def test_openssl_and_curl_enrollment(live_server: LiveServer, tmp_path: Path) -> None:
    token = live_server.mint_device("pi-0001")
    root = str(live_server.layout.root_cert)
    # 1. Key and CSR with openssl; base64 DER body as RFC 7030 4.2.1 requires.
    r = openssl_csr("device", "pi-0001", tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("openssl", "base64", "-in", "device.csr", "-out", "device.b64", cwd=tmp_path)
    assert r.returncode == 0
    # 2. curl posts it with HTTP Basic (device id + one-time token), trusting only our root.
    r = run(
        "curl",
        "-sS",
        "--fail-with-body",
        "--cacert",
        root,
        "-u",
        f"pi-0001:{token}",
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
        "@device.b64",
        "-o",
        "reply.b64",
        f"{live_server.est_url}/.well-known/est/simpleenroll",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    # 3. Decode the certs-only PKCS#7 with openssl.
    r = run("openssl", "base64", "-d", "-in", "reply.b64", "-out", "reply.p7", cwd=tmp_path)
    assert r.returncode == 0
    r = run(
        "openssl",
        "pkcs7",
        "-inform",
        "DER",
        "-in",
        "reply.p7",
        "-print_certs",
        "-out",
        "chain.pem",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    chain = (tmp_path / "chain.pem").read_text()
    assert chain.count("BEGIN CERTIFICATE") == 2
    # Split leaf and issuing CA, then verify the leaf as an SSL client against the root.
    blocks = [
        b + "-----END CERTIFICATE-----\n" for b in chain.split("-----END CERTIFICATE-----")[:-1]
    ]
    leaf = next(b for b in blocks if "CN = pi-0001" in b or "CN=pi-0001" in b)
    inter = next(b for b in blocks if "Issuing" in b)
    (tmp_path / "leaf.pem").write_text(leaf[leaf.index("-----BEGIN") :])
    (tmp_path / "inter.pem").write_text(inter[inter.index("-----BEGIN") :])
    r = run(
        "openssl",
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        root,
        "-untrusted",
        "inter.pem",
        "leaf.pem",
        cwd=tmp_path,
    )
    assert r.returncode == 0 and b"leaf.pem: OK" in r.stdout, r.stdout + r.stderr
    # A client certificate must fail as a server certificate.
    r = run(
        "openssl",
        "verify",
        "-purpose",
        "sslserver",
        "-CAfile",
        root,
        "-untrusted",
        "inter.pem",
        "leaf.pem",
        cwd=tmp_path,
    )
    assert r.returncode != 0
    # The key openssl made matches the issued certificate.
    pub_from_key = run("openssl", "pkey", "-in", "device.key", "-pubout", cwd=tmp_path).stdout
    pub_from_cert = run(
        "openssl", "x509", "-in", "leaf.pem", "-pubkey", "-noout", cwd=tmp_path
    ).stdout
    assert pub_from_key == pub_from_cert and pub_from_key.startswith(b"-----BEGIN PUBLIC KEY")
    # 4. Re-enroll with curl over mTLS using the new certificate and a fresh key.
    r = openssl_csr("device2", "pi-0001", tmp_path)
    assert r.returncode == 0
    run("openssl", "base64", "-in", "device2.csr", "-out", "device2.b64", cwd=tmp_path)
    r = run(
        "curl",
        "-sS",
        "--fail-with-body",
        "--cacert",
        root,
        "--cert",
        "leaf.pem",
        "--key",
        "device.key",
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
        "@device2.b64",
        "-o",
        "reply2.b64",
        f"{live_server.est_url}/.well-known/est/simplereenroll",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert (tmp_path / "reply2.b64").stat().st_size > 500


def test_curl_sees_clear_errors(live_server: LiveServer, tmp_path: Path) -> None:
    live_server.mint_device("pi-0002")
    (tmp_path / "junk.b64").write_bytes(b"@@@ not base64 @@@")
    r = run(
        "curl",
        "-sS",
        "--cacert",
        str(live_server.layout.root_cert),
        "-u",
        "pi-0002:wrong",
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
        "@junk.b64",
        "-w",
        "%{http_code}",
        f"{live_server.est_url}/.well-known/est/simpleenroll",
        cwd=tmp_path,
    )
    assert r.stdout.decode() == "unknown device or wrong enrollment token\n401"
