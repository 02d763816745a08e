"""The root CA key in a PKCS#11 token (`fleetpki init --root-key pkcs11:...`, SoftHSM2): the
root certificate, the issuing CA certificate and every root CRL signed by the token; no root
key in the home; what signs with the root (serve's root CRL, `ca sign-root-crl`,
`ca rollover-root`, `ca rollover`) uses the token; a token that cannot sign is a clear error
with nothing written, and serve keeps serving the root CRL it has.

Every PKCS#11 call runs in a subprocess with this module's own SOFTHSM2_CONF (tests/softhsm.py).
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import KeyType, generate_key
from tests.ca_ceremony import (
    EST,
    clean_env,
    fleetpki,
    home_snapshot,
    openssl_verify,
    serving,
    write_pem,
)
from tests.est_client import enroll_headers, request
from tests.pki_helpers import csr_der, make_csr
from tests.softhsm import softhsm_env

PIN = "root-pin-0017"
ROOT_URI = "pkcs11:token=fleet;object=root-ca"
ISSUING_URI = "pkcs11:token=fleet;object=issuing-ca"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**softhsm_env(tmp_path, PIN), **clean_env()}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`fleetpki ARGS` as a process (the PKCS#11 module reads this test's SOFTHSM2_CONF)."""
    return subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def _python(env: dict[str, str], code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


# The home's root CRL made due (signed by the token 20 days ago, for 30 days: past half life);
# then what the token says about the root's private key (PKCS#11 v2.40 4.9), and that its
# value cannot be read out.
_DUE_ROOT_CRL = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
import pkcs11
from pkcs11 import Attribute, ObjectClass
from enroll_server.home.layout import ROOT_CRL_LIFETIME, HomeLayout
from enroll_server.home.root import load_root_issuer, publish_root_crl
layout = HomeLayout(Path(sys.argv[1]))
root = load_root_issuer(layout, None)
publish_root_crl(layout, root, datetime.now(UTC) - timedelta(days=20), ROOT_CRL_LIFETIME)
root.key.close_session()
lib = pkcs11.lib(root.key.module)
with lib.get_token(token_label="fleet").open(user_pin=sys.argv[2]) as session:
    key = session.get_key(ObjectClass.PRIVATE_KEY, label=sys.argv[3])
    print("extractable", key[Attribute.EXTRACTABLE], "sensitive", key[Attribute.SENSITIVE])
    try:
        key[Attribute.VALUE]
        print("value readable")
    except pkcs11.PKCS11Error as exc:
        print("value refused", type(exc).__name__)
"""


def _enroll(env: dict[str, str], home: Path, est_url: str, out: Path, *batch: str) -> Path:
    """A device of a new batch (`batch create --count 1 BATCH...`) enrolls over EST (TLS
    verified with its bundle's ca.pem); its certificate's PEM path."""
    made = _run(env, "batch", "create", "--home", str(home), "--count", "1", "--out", str(out),
                *batch)  # fmt: skip
    assert made.returncode == 0, made.stderr
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    device, token = folder.name, (folder / "token").read_text().strip()
    ctx = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    body = base64.b64encode(csr_der(make_csr(generate_key(KeyType.EC_P256), device)))
    reply = request(
        est_url + EST + "/simpleenroll", ctx, "POST", body, enroll_headers(device, token)
    )
    assert reply.status == 200, (reply.status, reply.text)
    (leaf,) = [
        c
        for c in decode_certs_only(reply.body)
        if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ]
    return write_pem(out / "device.pem", [leaf])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: bytes = reply.read()
        return body


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    number: int = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return number


def test_root_and_issuing_keys_in_one_token_sign_the_chain_and_the_root_crl(
    env: dict[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    done = _run(env, "init", "--home", str(home), "--root-key", ROOT_URI, "--ca-key", ISSUING_URI,
                "--pin-file", str(pin_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"root key     {ROOT_URI};type=private" in done.stdout
    assert PIN not in done.stdout + done.stderr
    ca = home / "ca"
    assert not (ca / "root.key").exists() and not (ca / "issuing.key").exists()
    toml = (home / "fleetpki.toml").read_text()
    assert PIN not in toml
    config = tomllib.loads(toml)["ca"]
    assert config["root_key"] == ROOT_URI + ";type=private"
    assert config["key"] == ISSUING_URI + ";type=private"
    # The root signed itself and the issuing CA with the token's key: openssl agrees.
    assert openssl_verify(ca / "root.pem", ca / "issuing.pem").returncode == 0
    # A root CRL past half life (serve re-signs it with the token at start, below); the key
    # was made in the token as one that never leaves it.
    made_due = _python(env, _DUE_ROOT_CRL, str(home), PIN, "root-ca")
    assert made_due.returncode == 0, made_due.stderr
    assert "extractable False sensitive True" in made_due.stdout
    assert "value refused" in made_due.stdout
    due = x509.load_der_x509_crl((ca / "root.crl").read_bytes())
    assert _crl_number(due) == 2
    with serving(home, env) as server:
        leaf = _enroll(env, home, server.est_url, tmp_path / "batch")
        root_crl = tmp_path / "root.crl"
        root_crl.write_bytes(_get(server.http_url + "/root.crl"))
        issuing_crl = tmp_path / "issuing.crl"
        issuing_crl.write_bytes(_get(server.http_url + "/crl"))
    served = x509.load_der_x509_crl(root_crl.read_bytes())
    root = x509.load_pem_x509_certificate((ca / "root.pem").read_bytes())
    assert served.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert _crl_number(served) == 3 and served.next_update_utc > due.next_update_utc  # type: ignore[operator]
    for crl in (root_crl, issuing_crl):
        pem = x509.load_der_x509_crl(crl.read_bytes()).public_bytes(serialization.Encoding.PEM)
        crl.with_suffix(".pem").write_bytes(pem)
    ok = openssl_verify(ca / "root.pem", leaf, ca / "issuing.pem",
                        root_crl.with_suffix(".pem"), issuing_crl.with_suffix(".pem"))  # fmt: skip
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr


def test_a_root_token_that_cannot_sign_writes_nothing_and_serve_keeps_the_crl(
    env: dict[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    good = {**env, "FLEETPKI_PKCS11_PIN": PIN}
    done = _run(good, "init", "--home", str(home), "--root-key", ROOT_URI)
    assert done.returncode == 0, done.stderr
    assert (home / "ca" / "issuing.key").exists() and not (home / "ca" / "root.key").exists()
    made_due = _python(good, _DUE_ROOT_CRL, str(home), PIN, "root-ca")
    assert made_due.returncode == 0, made_due.stderr
    due = (home / "ca" / "root.crl").read_bytes()
    before = home_snapshot(home)
    bad = {**env, "FLEETPKI_PKCS11_PIN": "wrong-pin-17"}
    refused = _run(bad, "ca", "sign-root-crl", "--home", str(home))
    assert refused.returncode == 2
    assert "token 'fleet': wrong PIN" in refused.stderr and "wrong-pin-17" not in refused.stderr
    assert home_snapshot(home) == before
    # serve starts all the same (the root only re-signs its CRL, at half life): the CRL it
    # has is served, and the log says why it is not a new one.
    with serving(home, bad) as server:
        assert _get(server.http_url + "/root.crl") == due
    log = "".join(server.lines)  # the root CRL is looked at before serve says it listens
    assert "root CRL not re-signed" in log and "wrong PIN" in log, log
    assert "wrong-pin-17" not in log
    assert home_snapshot(home) == before
    # The token back: a root rollover signs the cross-certificates with the old root's key and
    # makes the new root's key in the token; fleetpki.toml names it, the new root signs the CRL.
    new_uri = "pkcs11:token=fleet;object=root-ca-2"
    rolled = _run(good, "ca", "rollover-root", "--home", str(home), "--new-root-key", new_uri)
    assert rolled.returncode == 0, rolled.stderr
    config = tomllib.loads((home / "fleetpki.toml").read_text())["ca"]
    assert config["root_key"] == new_uri + ";type=private"
    ca = home / "ca"
    assert not (ca / "root.key").exists()
    new_root = x509.load_pem_x509_certificate((ca / "root.pem").read_bytes())
    old_with_new = x509.load_pem_x509_certificates((ca / "root-update.pem").read_bytes())[0]
    assert old_with_new.public_key() == new_root.public_key()
    old_root = x509.load_pem_x509_certificate(before["ca/root.pem"])
    old_with_new.verify_directly_issued_by(old_root)
    crl = x509.load_der_x509_crl((ca / "root.crl").read_bytes())
    assert crl.is_signature_valid(new_root.public_key())  # type: ignore[arg-type]
    # The issuing CA rollover then signs a new issuing CA with the new root's token key.
    issuing = _run(good, "ca", "rollover", "--home", str(home))
    assert issuing.returncode == 0, issuing.stderr
    assert openssl_verify(ca / "root.pem", ca / "issuing.pem").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--root-offline", "DIR"], "--root-key and --root-offline exclude each other"),
        (["--external-root"], "--root-key and --external-root exclude each other"),
        (["--ca-key", ROOT_URI + ";type=private"], "name the same key"),
    ],
)
def test_init_refuses_a_root_key_with_another_root_place(
    tmp_path: Path, args: list[str], message: str
) -> None:
    home = tmp_path / "home"
    args = [str(tmp_path / "usb") if a == "DIR" else a for a in args]
    done = fleetpki("init", "--home", str(home), "--root-key", ROOT_URI, *args)
    assert done.returncode == 2 and message in " ".join(done.stderr.split())
    assert not home.exists() and not (tmp_path / "usb").exists()


@pytest.mark.parametrize(
    ("uri", "pin", "message"),
    [
        (ROOT_URI, "wrong-pin-9", "token 'fleet': wrong PIN"),
        ("pkcs11:token=absent;object=root-ca", PIN, "no token labelled 'absent'"),
    ],
)
def test_init_with_a_root_token_that_cannot_sign_writes_nothing(
    env: dict[str, str], tmp_path: Path, uri: str, pin: str, message: str
) -> None:
    home = tmp_path / "home"
    bad = {**env, "FLEETPKI_PKCS11_PIN": pin}
    done = _run(bad, "init", "--home", str(home), "--root-key", uri, "--ca-key", ISSUING_URI)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert pin not in done.stdout + done.stderr
    assert not home.exists()


def test_ca_commands_without_root_dir_need_a_home_whose_root_key_is_in_a_token(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    assert fleetpki("init", "--home", str(home)).returncode == 0
    before = home_snapshot(home)
    csr = tmp_path / "issuing.csr"
    csr.write_bytes(b"")
    for args in (["sign-root-crl"], ["sign-issuing", "--csr", str(csr), "--out", "x.pem"]):
        done = fleetpki("ca", *args, "--home", str(home))
        assert done.returncode == 2
        assert (
            "pass --root DIR (the offline root folder), or --home H whose root key is in a "
            "token" in " ".join(done.stderr.split())
        )
    assert home_snapshot(home) == before
