"""`fleetpki init --external-root` + `fleetpki ca import-issuing CERT CHAIN`: the issuing CA under
the operator's own PKI (a root and an intermediate made here with cryptography). The home
waits (serve refuses) until a certificate passes every check; each refusal names what is
wrong and leaves the home as it was; then serve enrolls devices that verify with the
operator's root only."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from enroll_server.home.layout import HomeLayout
from enroll_server.pki.keys import KeyType, generate_key
from tests.ca_ceremony import (
    NOW,
    OtherCa,
    agent_enroll,
    ca_usage,
    clean_env,
    enroll_from_bundle,
    fleetpki,
    home_snapshot,
    mqtt_publish,
    openssl_verify,
    other_pki_ca,
    serving,
    write_pem,
)
from tests.est_client import request
from tests.integration.test_hsm_init import PIN as HSM_PIN
from tests.integration.test_hsm_init import URI as HSM_URI
from tests.integration.test_hsm_init import _fleetpki as run_in_env
from tests.integration.test_hsm_init import env as softhsm_env  # noqa: F401  (a fixture)

OPERATOR_CDP = "http://pki.operator.example/intermediate.crl"


def _operator_pki(intermediate_path_length: int | None = 1) -> tuple[OtherCa, OtherCa]:
    root_key = generate_key(KeyType.EC_P384)
    root = OtherCa(other_pki_ca("Operator Root", root_key.public_key(), None, root_key), root_key)
    int_key = generate_key(KeyType.EC_P256)
    intermediate = OtherCa(
        other_pki_ca(
            "Operator Devices Intermediate",
            int_key.public_key(),
            root,
            root_key,
            path_length=intermediate_path_length,
        ),
        int_key,
    )
    return root, intermediate


def _sign_request(csr_path: Path, by: OtherCa, **options: object) -> x509.Certificate:
    """The operator's PKI signs our request for an issuing CA (CA:TRUE, pathLen 0)."""
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    kwargs = {"path_length": 0, "cdp": OPERATOR_CDP, **options}
    public_key = kwargs.pop("public_key", csr.public_key())
    return other_pki_ca("fleetpki Issuing CA", public_key, by, by.key, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def waiting(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    done = fleetpki("init", "--home", str(home), "--external-root")
    assert done.returncode == 0, done.stderr
    assert "waiting for the issuing CA certificate" in done.stdout
    return home


def test_the_home_waits_for_its_certificate_and_serve_says_so(waiting: Path) -> None:
    layout = HomeLayout(waiting)
    csr = x509.load_pem_x509_csr(layout.issuing_csr.read_bytes())
    assert csr.is_signature_valid
    asked = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert asked.ca and asked.path_length == 0
    usage = csr.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert layout.issuing_key.exists() and layout.issuing_key.stat().st_mode & 0o777 == 0o600
    for absent in (layout.root_key, layout.root_cert, layout.issuing_cert, layout.root_crl):
        assert not absent.exists(), absent
    refused = fleetpki("serve", "--home", str(waiting), "--no-broker", "--est-port", "0",
                       "--http-port", "0", "--admin-port", "0")  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert "waiting for the issuing CA certificate" in message
    assert "fleetpki ca import-issuing CERT CHAIN" in message


def test_import_signed_certificate_then_serve_enrolls_under_the_operator_root(
    waiting: Path, tmp_path: Path
) -> None:
    layout = HomeLayout(waiting)
    root, intermediate = _operator_pki()
    issuing = _sign_request(layout.issuing_csr, intermediate)
    cert_file = write_pem(tmp_path / "issuing.pem", [issuing])
    chain_file = write_pem(tmp_path / "chain.pem", [intermediate.cert, root.cert])
    done = fleetpki("ca", "import-issuing", str(cert_file), str(chain_file), "--home", str(waiting))
    assert done.returncode == 0, done.stderr
    pem = serialization.Encoding.PEM
    assert layout.root_cert.read_bytes() == root.cert.public_bytes(pem)
    assert x509.load_pem_x509_certificates(layout.chain.read_bytes()) == [
        issuing,
        intermediate.cert,
        root.cert,
    ]
    served_chain = x509.load_pem_x509_certificates(layout.server_cert.read_bytes())
    assert served_chain[1:] == [issuing, intermediate.cert]
    # A renewed server certificate keeps the intermediates after it.
    renewed = fleetpki("server-cert", "renew", "--home", str(waiting))
    assert renewed.returncode == 0, renewed.stderr
    served_again = x509.load_pem_x509_certificates(layout.server_cert.read_bytes())
    assert served_again[0] != served_chain[0]
    assert served_again[1:] == [issuing, intermediate.cert]
    assert not layout.root_crl.exists() and not layout.root_key.exists()
    # A second import: the home has its certificate.
    again = fleetpki(
        "ca", "import-issuing", str(cert_file), str(chain_file), "--home", str(waiting)
    )
    assert again.returncode == 2 and "already has its issuing CA certificate" in again.stderr
    env = clean_env()
    with serving(waiting, env, broker=True) as server:
        # No root CRL of ours: the operator's PKI publishes its own (the CDP it put in).
        assert request(server.http_url + "/root.crl", None).status == 404
        device = enroll_from_bundle(server, waiting, tmp_path / "lot", env)
        # The broker: its certificate verifies from the operator's root (the intermediates
        # follow it) and it takes the device's certificate (chain.pem holds them too).
        published = mqtt_publish(server, device)
        assert published.returncode == 0, published.stdout + published.stderr
        # The real agent from a second bundle: it checks /cacerts and the issued chain (the
        # intermediate included) against its ca.pem, the operator's root, and installs it.
        more = fleetpki("batch", "create", "--home", str(waiting), "--count", "1",
                        "--prefix", "agent", "--out", str(tmp_path / "lot2"))  # fmt: skip
        assert more.returncode == 0, more.stderr
        (bundle,) = [p for p in (tmp_path / "lot2").iterdir() if p.is_dir()]
        enrolled = agent_enroll(server, bundle)
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    # The bundle's trust anchor is the operator's root; /cacerts carries the whole chain.
    assert device.ca_pem.read_bytes() == root.cert.public_bytes(pem)
    assert set(device.cacerts) == {issuing, intermediate.cert, root.cert}  # a SET OF in PKCS#7
    cdp = issuing.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [x509.UniformResourceIdentifier(OPERATOR_CDP)]
    untrusted = write_pem(tmp_path / "untrusted.pem", [issuing, intermediate.cert])
    ok = openssl_verify(device.ca_pem, device.cert_path, untrusted)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    # Without the intermediate the path does not build: the check above is not vacuous.
    bare = openssl_verify(device.ca_pem, device.cert_path, write_pem(tmp_path / "i.pem", [issuing]))
    assert bare.returncode != 0


Made = tuple[x509.Certificate, list[OtherCa]]  # the certificate to import, the CHAIN given


def _wrong_key(csr: Path, root: OtherCa, intermediate: OtherCa) -> Made:
    other = generate_key(KeyType.EC_P256).public_key()
    return _sign_request(csr, intermediate, public_key=other), [intermediate, root]


def _not_a_ca(csr: Path, root: OtherCa, intermediate: OtherCa) -> Made:
    return _sign_request(csr, intermediate, ca=False, path_length=None), [intermediate, root]


def _no_crl_sign(csr: Path, root: OtherCa, intermediate: OtherCa) -> Made:
    return _sign_request(csr, intermediate, usage=ca_usage(crl_sign=False)), [intermediate, root]


def _path_len_0_above(csr: Path, root: OtherCa, _: OtherCa) -> Made:
    # The same root signs an intermediate with pathLen 0: only that pathLen is wrong.
    key = generate_key(KeyType.EC_P256)
    name = "Operator Tight Intermediate"
    cert = other_pki_ca(name, key.public_key(), root, root.key, path_length=0)
    tight = OtherCa(cert, key)
    return _sign_request(csr, tight), [tight, root]


def _server_only_above(csr: Path, root: OtherCa, _: OtherCa) -> Made:
    # An intermediate limited to serverAuth: every structural check passes, but no device
    # (clientAuth) certificate under it verifies: the probe finds that.
    key = generate_key(KeyType.EC_P256)
    name = "Operator TLS-server Intermediate"
    eku = [ExtendedKeyUsageOID.SERVER_AUTH]
    cert = other_pki_ca(name, key.public_key(), root, root.key, path_length=1, eku=eku)
    servers = OtherCa(cert, key)
    return _sign_request(csr, servers), [servers, root]


def _expired(csr: Path, root: OtherCa, intermediate: OtherCa) -> Made:
    gone = NOW - timedelta(hours=1)
    return _sign_request(csr, intermediate, not_after=gone), [intermediate, root]


def _wrong_chain(csr: Path, root: OtherCa, intermediate: OtherCa) -> Made:
    # A chain of the same names and other keys: the signatures do not verify.
    other_root, other_intermediate = _operator_pki()
    return _sign_request(csr, intermediate), [other_intermediate, other_root]


def _no_root(csr: Path, root: OtherCa, intermediate: OtherCa) -> Made:
    return _sign_request(csr, intermediate), [intermediate]


REFUSALS: dict[str, tuple[Callable[..., Made], str]] = {
    "wrong key": (_wrong_key, "is not for the issuing CA key this home made"),
    "not a CA": (_not_a_ca, "is not a CA (basicConstraints CA:TRUE missing)"),
    "no cRLSign": (_no_crl_sign, "keyUsage lacks cRLSign"),
    "pathLen 0 above": (_path_len_0_above, "has pathLen 0: it allows 0 CA(s) below it"),
    "expired": (_expired, "expired at"),
    "EKU above": (_server_only_above, "does not verify from the root"),
    "wrong chain": (_wrong_chain, "does not verify with the key of"),
    "chain without root": (_no_root, "no certificate in the chain is the issuer"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_import_issuing_refusals_name_the_problem_and_leave_the_home(
    waiting: Path, tmp_path: Path, case: str
) -> None:
    layout = HomeLayout(waiting)
    make, message = REFUSALS[case]
    root, intermediate = _operator_pki()
    cert, chain = make(layout.issuing_csr, root, intermediate)
    cert_file = write_pem(tmp_path / "issuing.pem", [cert])
    chain_file = write_pem(tmp_path / "chain.pem", [ca.cert for ca in chain])
    before = home_snapshot(waiting)
    done = fleetpki("ca", "import-issuing", str(cert_file), str(chain_file), "--home", str(waiting))
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in " ".join(done.stderr.split()), done.stderr
    assert home_snapshot(waiting) == before
    assert not layout.issuing_cert.exists()


def test_import_issuing_refuses_a_home_with_a_root_of_its_own(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert fleetpki("init", "--home", str(home)).returncode == 0
    _, intermediate = _operator_pki()
    cert = write_pem(tmp_path / "c.pem", [intermediate.cert])
    before = home_snapshot(home)
    done = fleetpki("ca", "import-issuing", str(cert), "--home", str(home))
    assert done.returncode == 2 and "fleetpki ca rollover" in " ".join(done.stderr.split())
    assert home_snapshot(home) == before


def test_external_root_with_the_issuing_key_in_a_token(
    softhsm_env: dict[str, str],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    """The request is signed in the token (a CSR re-signed over its TBS, like certificates)
    and import-issuing finds the key there: the server certificate it signs verifies."""
    home, pin_file = tmp_path / "home", tmp_path / "pin"
    pin_file.write_text(HSM_PIN + "\n")
    made = run_in_env(softhsm_env, "init", "--home", str(home), "--external-root",
                      "--ca-key", HSM_URI, "--pin-file", str(pin_file))  # fmt: skip
    assert made.returncode == 0, made.stderr
    layout = HomeLayout(home)
    assert not layout.issuing_key.exists()  # in the token only
    csr = x509.load_pem_x509_csr(layout.issuing_csr.read_bytes())
    assert csr.is_signature_valid
    root, intermediate = _operator_pki()
    issuing = _sign_request(layout.issuing_csr, intermediate)
    cert_file = write_pem(tmp_path / "issuing.pem", [issuing])
    chain_file = write_pem(tmp_path / "chain.pem", [intermediate.cert, root.cert])
    done = run_in_env(softhsm_env, "ca", "import-issuing", str(cert_file), str(chain_file),
                      "--home", str(home))  # fmt: skip
    assert done.returncode == 0, done.stderr
    served = layout.server_cert
    ok = openssl_verify(layout.root_cert, served, layout.chain)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
