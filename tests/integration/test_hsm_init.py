"""`fleetpki init --ca-key pkcs11:...`: the issuing CA key made in (or taken from) a SoftHSM2
token, named in fleetpki.toml without its PIN, and used by the server when it loads the home.

Every PKCS#11 call runs in a subprocess with this module's own SOFTHSM2_CONF, so the
suite's process never loads the module with another configuration (test_hsm_signer.py's).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.softhsm import softhsm_env

PIN = "init-pin-0042"
URI = "pkcs11:token=fleet;object=issuing-ca"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return softhsm_env(tmp_path, PIN)


def _fleetpki(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enroll_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# Loads the home as `fleetpki serve` does and issues one certificate through the template.
_ISSUE = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from cryptography.hazmat.primitives.serialization import Encoding
from enroll_server.home.layout import load_home
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.profile import DeviceProfile
from enroll_server.pki.signer import Pkcs11Signer
from enroll_server.pki.template import CertificateTemplate, device_certificates
from fleetpki.identity import DeviceId
home = load_home(Path(sys.argv[1]))
assert isinstance(home.issuer.key, Pkcs11Signer)
certs = device_certificates(home.issuer)
assert isinstance(certs, CertificateTemplate)
signed = certs.issue(generate_key(KeyType.EC_P256).public_key(), DeviceId("dev-1"),
                     datetime.now(UTC), DeviceProfile())
Path(sys.argv[2]).write_bytes(signed.der)
"""


# Opens the key a URI names, as `serve` would.
_OPEN = """
import os, sys
from enroll_server.pki.signer import DEFAULT_PKCS11_MODULE, Pkcs11Signer, parse_pkcs11_uri
pin = os.environ["FLEETPKI_PKCS11_PIN"]
Pkcs11Signer(DEFAULT_PKCS11_MODULE, parse_pkcs11_uri(sys.argv[1]), pin)
"""


def test_init_makes_the_key_in_the_token_and_serve_signs_with_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    done = _fleetpki(env, "init", "--home", str(home), "--ca-key", URI, "--pin-file", str(pin_file))
    assert done.returncode == 0, done.stderr
    assert PIN not in done.stdout + done.stderr
    assert f"issuing key  {URI};type=private" in done.stdout
    assert not (home / "ca" / "issuing.key").exists()  # no key file: the token holds it
    toml = (home / "fleetpki.toml").read_text()
    assert PIN not in toml
    ca = tomllib.loads(toml)["ca"]
    assert ca["key"] == URI + ";type=private" and ca["pkcs11_pin_file"] == str(pin_file)
    assert ca["pkcs11_module"].endswith("libsofthsm2.so")
    leaf = tmp_path / "leaf.der"
    issued = subprocess.run(
        [sys.executable, "-c", _ISSUE, str(home), str(leaf)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert issued.returncode == 0, issued.stderr
    cert_pem = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    (tmp_path / "leaf.pem").write_text(cert_pem)
    ok = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(home / "ca" / "chain.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stderr
    # Over an existing home without --force: refused before anything is made in the token.
    other = "pkcs11:token=fleet;object=never-made"
    refused = _fleetpki(
        env, "init", "--home", str(home), "--ca-key", other, "--pin-file", str(pin_file)
    )
    assert refused.returncode == 2 and "already initialized" in refused.stderr
    look = subprocess.run(
        [sys.executable, "-c", _OPEN, other],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "FLEETPKI_PKCS11_PIN": PIN},
        check=False,
    )
    assert look.returncode != 0 and "no private_key objects match" in look.stderr
    # A second home on the same token key (the key exists: taken, not made again).
    again = _fleetpki(
        {**env, "FLEETPKI_PKCS11_PIN": PIN}, "init", "--home", str(tmp_path / "h2"), "--ca-key", URI
    )
    assert again.returncode == 0, again.stderr
    # `serve` with a wrong PIN: refused at start, naming the token, not the PIN.
    pin_file.write_text("wrong-pin-7\n")
    serve = _fleetpki(env, "serve", "--home", str(home), "--no-broker", "--est-port", "0")
    assert serve.returncode == 2
    assert "token 'fleet': wrong PIN" in serve.stderr and "wrong-pin-7" not in serve.stderr


@pytest.mark.parametrize(
    ("args", "pin", "code", "message"),
    [
        (["--ca-key", "pkcs11:token=fleet"], PIN, 2, "an object label or id is required"),
        (["--ca-key", URI + "?pin-value=1234"], PIN, 2, "pin-value is not accepted"),
        (["--ca-key", URI], "wrong-pin-9", 1, "token 'fleet': wrong PIN"),
        (["--ca-key", "pkcs11:token=absent;object=k"], PIN, 1, "no token labelled 'absent'"),
        (["--ca-key", URI], "", 1, "no token PIN"),
        (["--ca-key", URI, "--key-type", "rsa-2048"], PIN, 2, "use --key-type ec-p256"),
    ],
)
def test_init_refuses_clearly_and_writes_nothing(
    env: dict[str, str], tmp_path: Path, args: list[str], pin: str, code: int, message: str
) -> None:
    home = tmp_path / "home"
    done = _fleetpki({**env, "FLEETPKI_PKCS11_PIN": pin}, "init", "--home", str(home), *args)
    assert done.returncode == code, done.stdout + done.stderr
    assert message in " ".join(done.stderr.split())
    if pin:
        assert pin not in done.stdout + done.stderr
    assert not (home / "fleetpki.toml").exists()
