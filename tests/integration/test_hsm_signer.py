"""The issuing CA key in a PKCS#11 token (SoftHSM2): every signature made by the token, every
signed object verified by openssl against the chain, and the failures a token can have.

This module owns one SoftHSM2 configuration (SOFTHSM2_CONF, token directory under tmp): a
PKCS#11 module reads it once per process, at C_Initialize.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from enroll_server.enrollment.operators import set_admin_token
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.config import ServerConfig
from enroll_server.home.layout import init_home, registry_location
from enroll_server.pki.ca import Issuer, build_issuing_ca
from enroll_server.pki.crl import build_crl
from enroll_server.pki.keys import KeyType, generate_key, private_key_pem
from enroll_server.pki.ocsp import CertStatusInfo, OcspResponder, respond
from enroll_server.pki.profile import DeviceProfile
from enroll_server.pki.signer import (
    DEFAULT_PKCS11_MODULE,
    BadSignature,
    Pkcs11Signer,
    SignerUnavailable,
    generate_pkcs11_key,
    parse_pkcs11_uri,
    token_signer,
)
from enroll_server.pki.template import CertificateTemplate, device_certificates
from enroll_server.registry import Registry
from enroll_server.registry.models import RevokedEntry
from enroll_server.revocation.publisher import CrlPublisher
from enroll_server.revocation.state import RevocationState
from fleetpki.identity import DeviceId
from tests.est_client import enroll_headers, request
from tests.live_server import start_live_server
from tests.pki_helpers import URLS, MemoryCa, csr_der, make_ca, make_csr

PIN = "4711-hsm"
EST = "/.well-known/est"
URI = "pkcs11:token=fleetpki-ca;object=issuing"


@dataclass
class Hsm:
    tokens: Path
    served_dir: str
    signer: Pkcs11Signer
    ca: MemoryCa  # root (file key) and, as `issuing`, the CA whose key is in the token


def _init_token(label: str) -> None:
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            PIN,
            "--so-pin",
            "so-" + PIN,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    base = tmp_path_factory.mktemp("softhsm")
    tokens = base / "tokens"
    tokens.mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        _init_token("fleetpki-ca")
        _init_token("spare")  # never logged in: where a wrong PIN is tried
        before = {d.name for d in tokens.iterdir()}
        # A live server's, removed while serving. SoftHSM2 then fails every token lookup
        # (GeneralError), so the removal is the last thing this module does.
        _init_token("served")
        (served_dir,) = {d.name for d in tokens.iterdir()} - before
        uri = parse_pkcs11_uri(URI)
        generate_pkcs11_key(DEFAULT_PKCS11_MODULE, uri, PIN)
        signer = Pkcs11Signer(DEFAULT_PKCS11_MODULE, uri, PIN)
        files = make_ca()
        now = datetime.now(UTC)
        cert = build_issuing_ca(signer, files.root, "HSM Issuing CA", now)
        ca = MemoryCa(files.root, Issuer(cert, signer, URLS), files.server_cert, files.server_key)
        yield Hsm(tokens, served_dir, signer, ca)
        signer.close_session()
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


def _pem(path: Path, *objs: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(b"".join(o.public_bytes(serialization.Encoding.PEM) for o in objs))
    return path


def _openssl(*args: str | Path) -> str:
    done = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout + done.stderr


def _ocsp_verified(tmp: Path, response: bytes, leaf: Path, chain: Path, issuer: Path) -> str:
    """`openssl ocsp` on a response: it must verify against the chain; its report."""
    (tmp / "resp.der").write_bytes(response)
    out = _openssl(
        "ocsp",
        "-respin",
        tmp / "resp.der",
        "-CAfile",
        chain,
        "-issuer",
        issuer,
        "-cert",
        leaf,
        "-no_nonce",
    )
    assert "Response verify OK" in out
    return out


def _ocsp_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    return request.public_bytes(serialization.Encoding.DER)


def test_issue_renew_revoke_crl_and_ocsp_verify_with_openssl(hsm: Hsm, tmp_path: Path) -> None:
    issuing, root = hsm.ca.issuing, hsm.ca.root
    # The template's self-check passes with the token: its fast path is what signs.
    certificates = device_certificates(issuing)
    assert isinstance(certificates, CertificateTemplate)
    now = datetime.now(UTC)
    device = DeviceId("hsm-device-1")
    key = generate_key(KeyType.EC_P256)
    first = x509.load_der_x509_certificate(
        certificates.issue(key.public_key(), device, now, DeviceProfile()).der
    )
    renewed = x509.load_der_x509_certificate(
        certificates.issue(
            generate_key(KeyType.EC_P256).public_key(), device, now, DeviceProfile()
        ).der
    )
    chain = _pem(tmp_path / "chain.pem", issuing.cert, root.cert)
    root_pem = _pem(tmp_path / "root.pem", root.cert)
    issuing_pem = _pem(tmp_path / "issuing.pem", issuing.cert)
    for n, cert in enumerate((first, renewed)):
        leaf = _pem(tmp_path / f"leaf{n}.pem", cert)
        out = _openssl("verify", "-CAfile", root_pem, "-untrusted", issuing_pem, leaf)
        assert f"{leaf}: OK" in out
    # The first certificate revoked (superseded by the renewal): the token signs the CRL.
    entry = RevokedEntry(first.serial_number, now, "superseded")
    crl = build_crl(issuing.cert, issuing.key, [entry], 7, now, timedelta(hours=1), URLS.crl)
    crl_pem = _pem(tmp_path / "crl.pem", crl)
    assert "verify OK" in _openssl("crl", "-in", crl_pem, "-noout", "-verify", "-CAfile", chain)
    with_crl = _pem(tmp_path / "chain_crl.pem", issuing.cert, root.cert, crl)
    leaf0 = tmp_path / "leaf0.pem"
    done = subprocess.run(
        ["openssl", "verify", "-crl_check", "-CAfile", with_crl, leaf0],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0 and "revoked" in done.stdout + done.stderr
    assert f"{tmp_path / 'leaf1.pem'}: OK" in _openssl(
        "verify", "-crl_check", "-CAfile", with_crl, tmp_path / "leaf1.pem"
    )
    # OCSP signed by the CA itself (the token): openssl checks it against the chain.
    responder = OcspResponder.by_issuer(issuing)
    statuses = {
        first.serial_number: CertStatusInfo.revoked(now, "superseded"),
        renewed.serial_number: CertStatusInfo.good(),
    }
    for n, (cert, word) in enumerate(((first, "revoked"), (renewed, "good"))):
        reply = respond(_ocsp_request(cert, issuing.cert), responder, statuses.__getitem__, now)
        out = _ocsp_verified(tmp_path, reply.der, tmp_path / f"leaf{n}.pem", chain, issuing_pem)
        assert f": {word}" in out


def test_ocsp_is_delegated_when_the_key_is_in_a_token(hsm: Hsm, tmp_path: Path) -> None:
    """RFC 6960 4.2.2.2: a responder certificate the token signs, responses signed in memory."""
    issuing, root = hsm.ca.issuing, hsm.ca.root
    registry = Registry.open(tmp_path / "registry.db")
    try:
        state = RevocationState.from_registry(registry, issuing)
        now = datetime.now(UTC)
        responder = state.responder(now)
        assert responder.delegated and responder.signer_cert.issuer == issuing.cert.subject
        # A key in memory: the CA signs its own responses.
        files = RevocationState.from_registry(registry, replace(hsm.ca.root, urls=URLS))
        assert not files.responder(now).delegated
        certificates = device_certificates(issuing)
        pub = generate_key(KeyType.EC_P256).public_key()
        signed = certificates.issue(pub, DeviceId("ocsp-1"), now, DeviceProfile())
        cert = x509.load_der_x509_certificate(signed.der)
        reply = state.answer(_ocsp_request(cert, issuing.cert))
        assert reply.outcome == "unknown"  # not in this registry: signed, but unknown
        leaf = _pem(tmp_path / "leaf.pem", cert)
        chain = _pem(tmp_path / "chain.pem", issuing.cert, root.cert)
        issuing_pem = _pem(tmp_path / "issuing.pem", issuing.cert)
        assert ": unknown" in _ocsp_verified(tmp_path, reply.der, leaf, chain, issuing_pem)
    finally:
        registry.close()


def test_a_signature_that_does_not_verify_never_leaves(
    hsm: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that signs wrongly (a faulty device, the wrong key behind the label): the
    signature is checked with the CA's public key and nothing is handed out."""
    certificates = device_certificates(hsm.ca.issuing)
    real = hsm.signer._raw_sign
    monkeypatch.setattr(hsm.signer, "_raw_sign", lambda data: real(data + b"!"))
    pub = generate_key(KeyType.EC_P256).public_key()
    with pytest.raises(BadSignature, match="does not verify with the CA key"):
        certificates.issue(pub, DeviceId("bad-sig"), datetime.now(UTC), DeviceProfile())
    with pytest.raises(BadSignature):
        build_crl(
            hsm.ca.issuing.cert, hsm.signer, [], 3, datetime.now(UTC), timedelta(hours=1), URLS.crl
        )


def test_key_is_not_extractable(hsm: Hsm) -> None:
    lib = pkcs11.lib(DEFAULT_PKCS11_MODULE)
    # The signer's login is the process's (PKCS#11 v2.40 5.6): this session shares it.
    with lib.get_token(token_label="fleetpki-ca").open() as session:
        (key,) = session.get_objects(
            {
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                pkcs11.Attribute.LABEL: "issuing",
            }
        )
        assert key[pkcs11.Attribute.EXTRACTABLE] is False
        assert key[pkcs11.Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            key[pkcs11.Attribute.VALUE]
        # Nor can it be wrapped out of the token under a key of the caller's choosing.
        wrapping = session.generate_key(
            pkcs11.KeyType.AES, 256, template={pkcs11.Attribute.WRAP: True}
        )
        with pytest.raises(pkcs11.PKCS11Error):
            wrapping.wrap_key(key)


def test_wrong_pin_and_missing_token_are_clear_errors(hsm: Hsm) -> None:
    with pytest.raises(SignerUnavailable, match=r"token 'spare': wrong PIN") as wrong:
        Pkcs11Signer(DEFAULT_PKCS11_MODULE, parse_pkcs11_uri("pkcs11:token=spare;object=x"), "0000")
    assert "0000" not in str(wrong.value)
    with pytest.raises(SignerUnavailable, match=r"no token labelled 'absent'"):
        Pkcs11Signer(DEFAULT_PKCS11_MODULE, parse_pkcs11_uri("pkcs11:token=absent;object=x"), PIN)
    with pytest.raises(SignerUnavailable, match=r"no private_key objects match"):
        Pkcs11Signer(DEFAULT_PKCS11_MODULE, parse_pkcs11_uri(URI.replace("issuing", "nokey")), PIN)


def test_session_lost_reconnects_on_the_next_signature(hsm: Hsm) -> None:
    certificates = device_certificates(hsm.ca.issuing)
    pub = generate_key(KeyType.EC_P256).public_key()
    hsm.signer._session.close()  # a module reset or a token reinserted drops the session
    again = certificates.issue(pub, DeviceId("after"), datetime.now(UTC), DeviceProfile())
    x509.load_der_x509_certificate(again.der).verify_directly_issued_by(hsm.ca.issuing.cert)


def test_serve_enroll_renew_revoke_then_the_token_goes_away(
    hsm: Hsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real server on a home whose issuing key is in the token: EST enroll and renew, an
    admin revoke, CRL and OCSP over HTTP, all checked by openssl; then the token is removed
    and devices hear 503 + Retry-After with nothing recorded."""
    uri = parse_pkcs11_uri("pkcs11:token=served;object=issuing")
    signer = token_signer(DEFAULT_PKCS11_MODULE, uri, PIN, create=True)
    home = tmp_path / "home"
    cfg = ServerConfig(ca_key=str(uri), pkcs11_module=DEFAULT_PKCS11_MODULE)
    now = datetime.now(UTC)
    result = init_home(home, cfg, now, issuing_signer=signer)
    with Registry.open(registry_location(result.layout), create=True) as registry:
        set_admin_token(registry, result.admin_token, now, actor="test")
    monkeypatch.setenv("FLEETPKI_PKCS11_PIN", PIN)
    server = start_live_server(home)
    try:
        chain = result.layout.chain
        key = generate_key(KeyType.EC_P256)
        token = server.mint_device("hsm-dev-1")
        reply = request(
            server.est_url + EST + "/simpleenroll",
            server.client_ssl(),
            "POST",
            base64.b64encode(csr_der(make_csr(key, "hsm-dev-1"))),
            enroll_headers("hsm-dev-1", token),
        )
        assert reply.status == 200, reply.text
        (first,) = [
            c for c in decode_certs_only(reply.body) if c.subject != result.issuing_cert.subject
        ]
        leaf = _pem(tmp_path / "first.pem", first)
        assert ": OK" in _openssl("verify", "-CAfile", chain, leaf)
        (tmp_path / "k.pem").write_bytes(private_key_pem(key, None))
        renewed_reply = request(
            server.est_url + EST + "/simplereenroll",
            server.client_ssl(leaf, tmp_path / "k.pem"),
            "POST",
            base64.b64encode(csr_der(make_csr(generate_key(KeyType.EC_P256), "hsm-dev-1"))),
            {"Content-Type": "application/pkcs10"},
        )
        assert renewed_reply.status == 200, renewed_reply.text
        (renewed,) = [
            c
            for c in decode_certs_only(renewed_reply.body)
            if c.subject != result.issuing_cert.subject
        ]
        renewed_pem = _pem(tmp_path / "renewed.pem", renewed)
        assert ": OK" in _openssl("verify", "-CAfile", chain, renewed_pem)
        revoked = request(
            server.admin_url + "/admin/devices/hsm-dev-1/revoke",
            server.client_ssl(),
            "POST",
            json.dumps({"reason": "key-compromise"}).encode(),
            {"Authorization": f"Bearer {server.admin_token}", "Content-Type": "application/json"},
        )
        assert revoked.status == 200, revoked.text
        deadline = time.monotonic() + 10
        while True:  # the CRL publisher polls the registry
            crl = x509.load_der_x509_crl(request(server.http_url + "/crl", None).body)
            if crl.get_revoked_certificate_by_serial_number(renewed.serial_number) or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(0.2)
        crl_pem = _pem(tmp_path / "crl.pem", crl)
        assert "verify OK" in _openssl("crl", "-in", crl_pem, "-noout", "-verify", "-CAfile", chain)
        with_crl = _pem(tmp_path / "chain_crl.pem", result.issuing_cert, result.root_cert, crl)
        done = subprocess.run(
            ["openssl", "verify", "-crl_check", "-CAfile", with_crl, renewed_pem],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode != 0 and "revoked" in done.stdout + done.stderr
        asked = request(
            server.http_url + "/ocsp",
            None,
            "POST",
            _ocsp_request(renewed, result.issuing_cert),
            {"Content-Type": "application/ocsp-request"},
        )
        issuing_pem = _pem(tmp_path / "issuing.pem", result.issuing_cert)
        assert ": revoked" in _ocsp_verified(tmp_path, asked.body, renewed_pem, chain, issuing_pem)
        # The token goes away while the server runs.
        shutil.rmtree(hsm.tokens / hsm.served_dir)
        token2 = server.mint_device("hsm-dev-2")
        refused = request(
            server.est_url + EST + "/simpleenroll",
            server.client_ssl(),
            "POST",
            base64.b64encode(csr_der(make_csr(generate_key(KeyType.EC_P256), "hsm-dev-2"))),
            enroll_headers("hsm-dev-2", token2),
        )
        assert refused.status == 503, refused.text
        assert int(refused.headers["retry-after"]) > 0 and "token 'served'" in refused.text
        assert PIN not in refused.text
        assert server.registry.certificates_of(DeviceId("hsm-dev-2")) == []
        # Not burned: the same token is still accepted (and refused again, for the same reason).
        assert (
            request(
                server.est_url + EST + "/simpleenroll",
                server.client_ssl(),
                "POST",
                base64.b64encode(csr_der(make_csr(generate_key(KeyType.EC_P256), "hsm-dev-2"))),
                enroll_headers("hsm-dev-2", token2),
            ).status
            == 503
        )
        # OCSP goes on: its delegated responder's key is in memory (until it needs renewing).
        again = request(
            server.http_url + "/ocsp",
            None,
            "POST",
            _ocsp_request(renewed, result.issuing_cert),
            {"Content-Type": "application/ocsp-request"},
        )
        assert ": revoked" in _ocsp_verified(tmp_path, again.body, renewed_pem, chain, issuing_pem)
        # The last CRL is still served (the publisher keeps it when a rebuild fails).
        assert request(server.http_url + "/crl", None).body == crl.public_bytes(Encoding.DER)
        # A responder signing with the CA key itself answers tryLater; a new CRL cannot be made.
        issuer = Issuer(result.issuing_cert, signer, cfg.urls())
        by_issuer = RevocationState(
            CrlPublisher(server.registry, issuer), issuer, lambda serial: CertStatusInfo.good()
        )
        assert by_issuer.answer(_ocsp_request(renewed, issuer.cert)).outcome == "tryLater"
        with pytest.raises(SignerUnavailable, match="token 'served'"):
            build_crl(issuer.cert, signer, [], 9, now, timedelta(hours=1), URLS.crl)
    finally:
        server.stop()
