"""`fleetpki init --root-offline DIR`: the root key only in DIR (its own passphrase, never the
home's), serve without it (the root CRL from the file, a warning before its nextUpdate), and the
ceremonies that need it: `fleetpki ca sign-root-crl`, `fleetpki ca sign-issuing`."""

from __future__ import annotations

import logging
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.home.config import load_config
from enroll_server.home.layout import HomeLayout, home_passphrase
from enroll_server.home.root import OfflineRoot
from enroll_server.pki.ca import Issuer, issuing_ca_csr
from enroll_server.pki.errors import BadPassphrase
from enroll_server.pki.issuing_import import check_issuing_certificate
from enroll_server.pki.keys import KeyType, generate_key, load_private_key_pem
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from fleetpki.identity import DeviceId
from tests.ca_ceremony import (
    clean_env,
    enroll_from_bundle,
    fleetpki,
    home_snapshot,
    openssl_verify,
    serving,
    write_pem,
)
from tests.est_client import request
from tests.live_server import start_live_server

PHRASE = "offline root passphrase 17"


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    number: int = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return number


def _pem_crl(der: bytes, path: Path) -> Path:
    crl = x509.load_der_x509_crl(der)
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def offline(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A home made by `fleetpki init --root-offline usb`: (home, usb, passphrase file)."""
    home, usb, phrase_file = tmp_path / "home", tmp_path / "usb", tmp_path / "root-phrase"
    phrase_file.write_text(PHRASE + "\n")
    done = fleetpki("init", "--home", str(home), "--root-offline", str(usb),
                    "--root-passphrase-file", str(phrase_file),
                    "--root-crl-days", "200")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert PHRASE not in done.stdout + done.stderr
    return home, usb, phrase_file


def test_the_root_key_is_only_in_dir_under_its_own_passphrase(
    offline: tuple[Path, Path, Path],
) -> None:
    home, usb, _ = offline
    layout, folder = HomeLayout(home), OfflineRoot(usb)
    assert not layout.root_key.exists()
    assert folder.key.stat().st_mode & 0o777 == 0o600
    assert folder.key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert folder.cert.read_bytes() == layout.root_cert.read_bytes()
    # Nothing in the home opens it: not the home's passphrase, and the root's is nowhere there.
    with pytest.raises(BadPassphrase):
        load_private_key_pem(folder.key.read_bytes(), home_passphrase(layout))
    assert not [name for name, data in home_snapshot(home).items() if PHRASE.encode() in data]
    root = load_private_key_pem(folder.key.read_bytes(), PHRASE.encode())
    root_cert = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
    assert root.public_key() == root_cert.public_key()
    assert tomllib.loads(layout.config.read_text())["ca"]["root"] == "offline"
    # The root CRL was signed at init for --root-crl-days, kept in the home and in DIR.
    crl = x509.load_der_x509_crl(layout.root_crl.read_bytes())
    assert crl.is_signature_valid(root_cert.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None
    life = crl.next_update_utc - crl.last_update_utc
    assert timedelta(days=200) <= life <= timedelta(days=200, hours=1)  # thisUpdate backdated
    assert folder.crl.read_bytes() == layout.root_crl.read_bytes()


def test_serve_enrolls_without_the_root_key_and_publishes_each_ceremonys_crl(
    offline: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    home, usb, phrase_file = offline
    layout, env = HomeLayout(home), clean_env()
    with serving(home, env) as server:
        served = request(server.http_url + "/root.crl", None)
        assert served.status == 200 and served.body == layout.root_crl.read_bytes()
        device = enroll_from_bundle(server, home, tmp_path / "lot", env)
        # The device's chain, the bundle's ca.pem as the only anchor, both CRLs checked.
        crls = [
            _pem_crl(served.body, tmp_path / "root.crl.pem"),
            _pem_crl(request(server.http_url + "/crl", None).body, tmp_path / "crl.pem"),
        ]
        ok = openssl_verify(device.ca_pem, device.cert_path, layout.issuing_cert, *crls)
        assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
        # The ceremony while serve runs: DIR mounted, the next root CRL, served soon after.
        before = home_snapshot(home)
        done = fleetpki("ca", "sign-root-crl", "--root", str(usb), "--home", str(home),
                        "--days", "400", "--root-passphrase-file", str(phrase_file),
                        env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert home_snapshot(home) != before
        fresh = x509.load_der_x509_crl(layout.root_crl.read_bytes())
        assert _crl_number(fresh) == 2
        assert OfflineRoot(usb).crl.read_bytes() == layout.root_crl.read_bytes()
        deadline = time.monotonic() + 20
        while request(server.http_url + "/root.crl", None).body != layout.root_crl.read_bytes():
            assert time.monotonic() < deadline, "serve kept the old root CRL"
            time.sleep(0.5)
    assert "Traceback" not in "".join(server.lines)


def test_sign_issuing_ceremony_signs_a_ca_that_chains_to_the_root(
    offline: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    home, usb, _ = offline
    layout = HomeLayout(home)
    key = generate_key(KeyType.EC_P256)
    csr = tmp_path / "issuing.csr"
    csr.write_bytes(
        issuing_ca_csr(key, "fleetpki Issuing CA 2").public_bytes(serialization.Encoding.PEM)
    )
    out = tmp_path / "issuing2.pem"
    # On a ceremony machine: no home, the CDP given by hand.
    env = clean_env(FLEETPKI_ROOT_PASSPHRASE=PHRASE)
    done = fleetpki("ca", "sign-issuing", "--root", str(usb), "--csr", str(csr), "--out",
                    str(out), "--crl-url", "http://pki.example/root.crl", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    issued = x509.load_pem_x509_certificates(out.read_bytes())
    cert, root_cert = issued[0], issued[1]
    assert root_cert.public_bytes(serialization.Encoding.PEM) == layout.root_cert.read_bytes()
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [x509.UniformResourceIdentifier("http://pki.example/root.crl")]
    assert cert.subject.rfc4514_string() == "CN=fleetpki Issuing CA 2,O=fleetpki"
    now = datetime.now(UTC)
    checked = check_issuing_certificate(cert, [root_cert], key.public_key(), now)
    assert checked.root == root_cert and checked.intermediates == ()
    ca_file = write_pem(tmp_path / "ca2.pem", [cert])
    ok = openssl_verify(layout.root_cert, ca_file)
    assert ok.returncode == 0, ok.stderr
    # A device certificate under the new issuing CA verifies against the same root.
    device = build_device_certificate(
        generate_key(KeyType.EC_P256).public_key(),
        DeviceId("dev-after-ceremony"),
        Issuer(cert, key, load_config(layout.config).urls()),
        now,
        DeviceProfile(),
    )
    leaf = write_pem(tmp_path / "leaf.pem", [device])
    ok = openssl_verify(layout.root_cert, leaf, ca_file)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stderr
    # With the home: its /root.crl is the CDP.
    done = fleetpki("ca", "sign-issuing", "--root", str(usb), "--csr", str(csr), "--out",
                    str(out), "--home", str(home), env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    cert = x509.load_pem_x509_certificates(out.read_bytes())[0]
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    url = load_config(layout.config).urls().root_crl
    assert url is not None and cdp[0].full_name == [x509.UniformResourceIdentifier(url)]


def test_ceremony_refusals_name_the_problem_and_change_nothing(
    offline: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    home, usb, phrase_file = offline
    wrong = tmp_path / "wrong-phrase"
    wrong.write_text("not the root passphrase\n")
    other_home, other_usb = tmp_path / "other", tmp_path / "other-usb"
    made = fleetpki("init", "--home", str(other_home), "--root-offline", str(other_usb),
                    "--root-passphrase-file", str(phrase_file))  # fmt: skip
    assert made.returncode == 0, made.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (usb, wrong, "wrong passphrase"),
        (other_usb, phrase_file, "not the home's root"),
        (tmp_path / "absent", phrase_file, "not found (is the medium mounted?)"),
        (empty, phrase_file, "root.key missing"),
    ]
    before, usb_before = home_snapshot(home), home_snapshot(usb)
    for folder, phrase, message in cases:
        done = fleetpki("ca", "sign-root-crl", "--root", str(folder), "--home", str(home),
                        "--root-passphrase-file", str(phrase))  # fmt: skip
        assert done.returncode == 2, (folder, done.stdout, done.stderr)
        assert message in " ".join(done.stderr.split()), (message, done.stderr)
    no_phrase = fleetpki("ca", "sign-root-crl", "--root", str(usb), "--home", str(home))
    assert no_phrase.returncode == 2 and "FLEETPKI_ROOT_PASSPHRASE" in no_phrase.stderr
    assert home_snapshot(home) == before and home_snapshot(usb) == usb_before
    # The online-root path says where the key is instead: not in this home.
    assert PHRASE not in no_phrase.stderr


@pytest.mark.parametrize(
    ("phrase", "prepare", "message"),
    [
        ("short", None, "use 12+"),
        (PHRASE, "root.key", "already holds a root"),
        (None, None, "FLEETPKI_ROOT_PASSPHRASE"),
        (PHRASE, "parent is a file", "cannot write the offline root"),
    ],
)
def test_init_root_offline_refusals_write_nothing(
    tmp_path: Path, phrase: str | None, prepare: str | None, message: str
) -> None:
    home, usb = tmp_path / "home", tmp_path / "usb"
    if prepare == "parent is a file":  # DIR cannot be made: found only when writing it
        (tmp_path / "medium").write_text("a file, not a mounted medium\n")
        usb = tmp_path / "medium" / "usb"
    elif prepare is not None:
        usb.mkdir()
        (usb / prepare).write_text("an earlier root\n")
    args = ["init", "--home", str(home), "--root-offline", str(usb)]
    env = clean_env(FLEETPKI_ROOT_PASSPHRASE=phrase) if phrase else clean_env()
    done = fleetpki(*args, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in " ".join(done.stderr.split())
    assert not home.exists()
    assert not (usb / "root.pem").exists()


def test_serve_warns_before_the_root_crl_runs_out_and_never_needs_the_key(
    offline: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    home, _, _ = offline
    layout = HomeLayout(home)
    config = layout.config.read_text()
    # The CRL of init lives 200 days: a 300-day warning is on now.
    layout.config.write_text(
        config.replace('root_crl_warning = "30d"', 'root_crl_warning = "300d"')
    )
    caplog.set_level(logging.WARNING)
    server = start_live_server(home)
    try:
        metrics = server.metrics()
        assert request(server.http_url + "/root.crl", None).status == 200
    finally:
        server.stop()
    crl = x509.load_der_x509_crl(layout.root_crl.read_bytes())
    assert crl.next_update_utc is not None
    assert f"fleetpki_root_crl_next_update_seconds {crl.next_update_utc.timestamp():.0f}" in metrics
    assert "fleetpki_root_crl_warning 1" in metrics
    warned = [r.getMessage() for r in caplog.records if "root CRL" in r.getMessage()]
    assert len(warned) == 1 and "fleetpki ca sign-root-crl --root DIR" in warned[0], warned
    # No root CRL at all (the file lost): serve still starts, /root.crl is 404, it warns.
    layout.root_crl.unlink()
    caplog.clear()
    server = start_live_server(home)
    try:
        assert request(server.http_url + "/root.crl", None).status == 404
        assert "fleetpki_root_crl_warning 1" in server.metrics()
    finally:
        server.stop()
    assert any("no root CRL to serve" in r.getMessage() for r in caplog.records)
    # The default warning (30 days) is off for a fresh 200-day CRL.
    layout.config.write_text(config)
    done = fleetpki("ca", "sign-root-crl", "--root", str(offline[1]), "--home", str(home),
                    "--root-passphrase-file", str(offline[2]))  # fmt: skip
    assert done.returncode == 0, done.stderr
    server = start_live_server(home)
    try:
        assert "fleetpki_root_crl_warning 0" in server.metrics()
    finally:
        server.stop()


def test_air_gapped_root_crl_ceremony_and_its_import(
    offline: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    home, usb, phrase_file = offline
    layout = HomeLayout(home)
    # The ceremony machine has no home: the CRL goes to DIR only.
    done = fleetpki("ca", "sign-root-crl", "--root", str(usb), "--days", "300",
                    "--root-passphrase-file", str(phrase_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    signed = OfflineRoot(usb).crl.read_bytes()
    assert _crl_number(x509.load_der_x509_crl(signed)) == 2
    assert layout.root_crl.read_bytes() != signed
    # Back at the server: refused from another root, then taken, then an older one refused.
    other_home, other_usb = tmp_path / "other", tmp_path / "other-usb"
    made = fleetpki("init", "--home", str(other_home), "--root-offline", str(other_usb),
                    "--root-passphrase-file", str(phrase_file))  # fmt: skip
    assert made.returncode == 0, made.stderr
    before = home_snapshot(home)
    theirs = OfflineRoot(other_usb).crl
    foreign = fleetpki("ca", "import-root-crl", str(theirs), "--home", str(home))
    assert foreign.returncode == 2 and "not signed by the home's root CA" in foreign.stderr
    garbage = tmp_path / "garbage.crl"
    garbage.write_bytes(b"not a crl")
    bad = fleetpki("ca", "import-root-crl", str(garbage), "--home", str(home))
    assert bad.returncode == 2 and "not a CRL" in bad.stderr
    assert home_snapshot(home) == before
    taken = fleetpki("ca", "import-root-crl", str(OfflineRoot(usb).crl), "--home", str(home))
    assert taken.returncode == 0, taken.stderr
    assert layout.root_crl.read_bytes() == signed
    first = tmp_path / "first.crl"
    first.write_bytes(before["ca/root.crl"])
    older = fleetpki("ca", "import-root-crl", str(first), "--home", str(home))
    assert older.returncode == 2 and "older than the home's 2" in older.stderr
    assert layout.root_crl.read_bytes() == signed


def test_sign_issuing_refuses_a_request_that_is_not_one_or_not_self_signed(
    offline: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, usb, phrase_file = offline
    key = generate_key(KeyType.EC_P256)
    good = issuing_ca_csr(key, "fleetpki Issuing CA 3").public_bytes(serialization.Encoding.DER)
    forged = bytearray(good)
    forged[-3] ^= 0x01  # inside the signature value: proof of possession fails
    cases = [(b"not a request", "not a PKCS#10 request"), (bytes(forged), "does not verify")]
    for data, message in cases:
        csr = tmp_path / "req.der"
        csr.write_bytes(data)
        out = tmp_path / "out.pem"
        done = fleetpki("ca", "sign-issuing", "--root", str(usb), "--csr", str(csr), "--out",
                        str(out), "--root-passphrase-file", str(phrase_file))  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        assert message in done.stderr, done.stderr
        assert not out.exists()
