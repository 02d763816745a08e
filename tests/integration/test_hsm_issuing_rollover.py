"""Issuing CA rollover when the issuing key is in a PKCS#11 token (SoftHSM2):
`fleetpki ca rollover --ca-key pkcs11:...;object=NEW` makes the new key in the token, the root
signs it, fleetpki.toml names it; a running serve signs with it; the previous issuer's key stays
in the token and keeps signing its CRL and OCSP answers until it is revoked (its token objects
destroyed). Refusals (no --ca-key, the current object, a wrong PIN) leave the home untouched.

Every PKCS#11 call runs in a subprocess with this module's own SOFTHSM2_CONF (tests/softhsm.py).
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from enroll_server.pki.key_id import key_id
from tests.ca_ceremony import home_snapshot, openssl_verify, serving
from tests.est_client import ask_ocsp
from tests.integration.test_hsm_root import PIN, _enroll, _get, _python, _run, env  # noqa: F401

OLD_URI = "pkcs11:token=fleet;object=issuing-ca"
NEW_URI = "pkcs11:token=fleet;object=issuing-ca-2"

# Which private-key objects the token holds, by label.
_LABELS = """
import sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
from enroll_server.pki.signer import module_path
lib = pkcs11.lib(module_path(None))
with lib.get_token(token_label="fleet").open(user_pin=sys.argv[1]) as session:
    keys = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
    print(sorted(k.label for k in keys))
"""


def _until(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


def _signed_by(answer: ocsp.OCSPResponse, issuer: x509.Certificate) -> bool:
    """The answer is signed by the delegated responder (a CA key in a token delegates OCSP,
    RFC 6960 4.2.2.2) that `issuer`'s key certified."""
    (responder,) = answer.certificates
    try:
        responder.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    key = responder.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and answer.signature_hash_algorithm
    try:
        key.verify(
            answer.signature, answer.tbs_response_bytes, ec.ECDSA(answer.signature_hash_algorithm)
        )
    except InvalidSignature:
        return False
    return True


def _crl(url: str) -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl(_get(url))


def _init(base: dict[str, str], tmp_path: Path, *args: str) -> tuple[Path, Path, dict[str, str]]:
    """`fleetpki init ARGS` with the right PIN: the home, its ca/ and that environment."""
    home, good = tmp_path / "home", {**base, "FLEETPKI_PKCS11_PIN": PIN}
    done = _run(good, "init", "--home", str(home), *args)
    assert done.returncode == 0, done.stderr
    return home, home / "ca", good


def test_issuing_rollover_in_a_token_signs_with_the_new_key_and_keeps_the_old_one_live(
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    home, ca, good = _init(env, tmp_path, "--ca-key", OLD_URI)
    old_issuer = x509.load_pem_x509_certificate((ca / "issuing.pem").read_bytes())
    before = home_snapshot(home)
    # Refused, nothing written: no --ca-key; the current key's object; a wrong PIN.
    bad = {**good, "FLEETPKI_PKCS11_PIN": "wrong-pin-17"}
    for run_env, args, message in (
        (good, [], "pass --ca-key pkcs11:token=...;object=..."),
        (good, ["--ca-key", OLD_URI], "is a live issuing CA's key: name a new object"),
        (bad, ["--ca-key", NEW_URI], "token 'fleet': wrong PIN"),
    ):
        refused = _run(run_env, "ca", "rollover", "--home", str(home), *args)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert message in " ".join(refused.stderr.split()), refused.stderr
        assert "wrong-pin-17" not in refused.stderr
        assert home_snapshot(home) == before
    assert _python(good, _LABELS, PIN).stdout.strip() == "['issuing-ca']"

    with serving(home, good) as server:
        old_leaf = _enroll(good, home, server.est_url, tmp_path / "a")
    # (A running serve takes a rollover up at its next look at the files, every minute:
    # test_issuing_rollover.py shows it live; here serve starts again on the rolled home.)
    rolled = _run(good, "ca", "rollover", "--home", str(home), "--ca-key", NEW_URI)
    assert rolled.returncode == 0, rolled.stderr
    new_issuer = x509.load_pem_x509_certificate((ca / "issuing.pem").read_bytes())
    new_id = key_id(new_issuer)
    with serving(home, good) as server:
        new_leaf = _enroll(good, home, server.est_url, tmp_path / "b", "--start", "2")
        new_cert = x509.load_pem_x509_certificate(new_leaf.read_bytes())
        assert new_cert.issuer == new_issuer.subject
        new_cert.verify_directly_issued_by(new_issuer)
        old_cert = x509.load_pem_x509_certificate(old_leaf.read_bytes())
        # The old issuer's key, still in the token, signs its CRL (a revocation now) and
        # OCSP answers; the new one answers for its own.
        revoked = _run(good, "cert", "revoke", f"{old_cert.serial_number:x}", "--home", str(home))
        assert revoked.returncode == 0, revoked.stderr

        def old_crl_lists() -> bool:
            crl = _crl(server.http_url + "/crl")
            return crl.get_revoked_certificate_by_serial_number(old_cert.serial_number) is not None

        _until(old_crl_lists, "the old issuer's CRL lists the revoked certificate")
        old_crl = _crl(server.http_url + "/crl")
        new_crl = _crl(server.http_url + f"/crl/{new_id}")
        root_crl = _crl(server.http_url + "/root.crl")
        answers = [
            (ask_ocsp(server.http_url, old_cert, old_issuer), old_issuer),
            (ask_ocsp(server.http_url, new_cert, new_issuer), new_issuer),
        ]
    assert old_crl.is_signature_valid(old_issuer.public_key())  # type: ignore[arg-type]
    assert new_crl.is_signature_valid(new_issuer.public_key())  # type: ignore[arg-type]
    assert answers[0][0].certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert answers[1][0].certificate_status is ocsp.OCSPCertStatus.GOOD
    assert all(_signed_by(answer, issuer) for answer, issuer in answers)
    # openssl: the new certificate against chain.pem with every CRL (root's, both issuers').
    crls = []
    for name, crl in (("root", root_crl), ("old", old_crl), ("new", new_crl)):
        path = tmp_path / f"{name}.crl.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        crls.append(path)
    ok = openssl_verify(ca / "root.pem", new_leaf, ca / "chain.pem", *crls)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    gone = openssl_verify(ca / "root.pem", old_leaf, ca / "chain.pem", *crls)
    assert "certificate revoked" in gone.stdout + gone.stderr
    # The home: fleetpki.toml names the new object; the old one is recorded for its CRL.
    config = tomllib.loads((home / "fleetpki.toml").read_text())["ca"]
    assert config["key"] == NEW_URI + ";type=private"
    old_id = key_id(old_issuer)
    assert (ca / "issuers" / f"{old_id}.uri").read_text().strip() == OLD_URI + ";type=private"
    assert not (ca / "issuing.key").exists() and not (ca / "issuing.next").exists()
    assert _python(good, _LABELS, PIN).stdout.strip() == "['issuing-ca', 'issuing-ca-2']"
    # A rollover cut short after issuing.pem, before fleetpki.toml: the next command that
    # loads the home finds the new key through issuing.next and finishes the step.
    toml = home / "fleetpki.toml"
    toml.write_text(toml.read_text().replace("issuing-ca-2", "issuing-ca"))
    (ca / "issuing.next").write_text(NEW_URI + ";type=private\n")
    # A compromise of the old issuer: revoked at the root, its token objects destroyed.
    out = _run(good, "ca", "revoke-issuing", old_id, "--home", str(home))
    assert out.returncode == 0, out.stderr
    config = tomllib.loads(toml.read_text())["ca"]
    assert config["key"] == NEW_URI + ";type=private"
    assert not (ca / "issuing.next").exists()
    assert not (ca / "issuers" / f"{old_id}.uri").exists()
    assert _python(good, _LABELS, PIN).stdout.strip() == "['issuing-ca-2']"


def test_a_file_key_home_rolls_over_into_a_token(
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    home, ca, good = _init(env, tmp_path)
    old_id = key_id(x509.load_pem_x509_certificate((ca / "issuing.pem").read_bytes()))
    rolled = _run(good, "ca", "rollover", "--home", str(home), "--ca-key", NEW_URI)
    assert rolled.returncode == 0, rolled.stderr
    config = tomllib.loads((home / "fleetpki.toml").read_text())["ca"]
    assert config["key"] == NEW_URI + ";type=private"
    assert not (ca / "issuing.key").exists() and (ca / "issuers" / f"{old_id}.key").exists()
    assert openssl_verify(ca / "root.pem", ca / "issuing.pem").returncode == 0
    assert _python(good, _LABELS, PIN).stdout.strip() == "['issuing-ca-2']"
    # The home's issuing key is in the token now: the next rollover needs --ca-key.
    again = _run(good, "ca", "rollover", "--home", str(home))
    assert again.returncode == 2 and "pass --ca-key" in again.stderr, again.stderr
