"""EST (RFC 7030) against the real service on 127.0.0.1: enrollment, re-enrollment, bad input."""

from __future__ import annotations

import base64
import sqlite3
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import load_home
from enroll_server.pki.keys import KeyType, PrivateKey, generate_key, private_key_pem
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.registry import CertStatus, DeviceState
from fleetpki.identity import DeviceId
from tests.est_client import Reply, basic, enroll_headers, request
from tests.live_server import LiveServer
from tests.pki_helpers import csr_der, make_csr

EST = "/.well-known/est"


def leaf(certs: list[x509.Certificate]) -> x509.Certificate:
    """The end-entity certificate of a certs-only reply (the one that is not a CA)."""
    (ee,) = [
        c for c in certs if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ]
    return ee


def b64(der: bytes) -> bytes:
    return base64.b64encode(der)


def enroll(
    server: LiveServer,
    device: str,
    token: str,
    key: PrivateKey | None = None,
    cn: str | None = None,
) -> Reply:
    key = key or generate_key(KeyType.EC_P256)
    body = b64(csr_der(make_csr(key, cn or device)))
    return request(
        server.est_url + EST + "/simpleenroll",
        server.client_ssl(),
        "POST",
        body,
        enroll_headers(device, token),
    )


def snapshot(server: LiveServer, device: str) -> tuple[int, str, list[str]]:
    """What a rejected request must not change: cert count, device state, token liveness."""
    did = DeviceId(device)
    certs = server.registry.certificates_of(did)
    dev = server.registry.get_device(did)
    return (len(certs), dev.state.value if dev else "-", [c.status.value for c in certs])


def write_identity(tmp: Path, cert: x509.Certificate, key: PrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = tmp / "c.pem", tmp / "k.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_key_pem(key, None))
    return cert_path, key_path


def test_cacerts_returns_issuing_and_root(live_server: LiveServer) -> None:
    r = request(live_server.est_url + EST + "/cacerts", live_server.client_ssl())
    assert r.status == 200
    assert r.headers["content-type"].startswith("application/pkcs7-mime")
    certs = decode_certs_only(r.body)
    # PKCS#7 certificates are a DER SET OF: order carries no meaning (RFC 5652 5.1).
    subjects = {c.subject.rfc4514_string() for c in certs}
    assert subjects == {"CN=fleetpki Issuing CA,O=fleetpki", "CN=fleetpki Root CA,O=fleetpki"}


def test_csrattrs_is_der(live_server: LiveServer) -> None:
    r = request(live_server.est_url + EST + "/csrattrs", live_server.client_ssl())
    assert r.status == 200 and r.headers["content-type"] == "application/csrattrs"
    der = base64.b64decode(r.body)
    assert der[0] == 0x30  # SEQUENCE OF AttrOrOID
    # id-ecPublicKey (1.2.840.10045.2.1) and secp256r1 are offered.
    assert bytes.fromhex("2a8648ce3d0201") in der and bytes.fromhex("2a8648ce3d030107") in der


def test_simpleenroll_issues_profiled_certificate(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-1")
    key = generate_key(KeyType.EC_P256)
    r = enroll(live_server, "dev-1", token, key)
    assert r.status == 200, r.text
    assert r.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    certs = decode_certs_only(r.body)
    cert = leaf(certs)
    assert {c.subject for c in certs} == {cert.subject, live_server.handle.home.issuer.cert.subject}
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:fleetpki:device:dev-1"]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name[0].value.endswith("/crl")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(days=30, minutes=5)
    # Recorded before it was returned; the device is active and the token is spent.
    rec = live_server.registry.get_certificate(cert.serial_number)
    assert rec is not None and rec.status is CertStatus.ACTIVE
    dev = live_server.registry.get_device(DeviceId("dev-1"))
    assert dev is not None and dev.state is DeviceState.ACTIVE
    again = enroll(live_server, "dev-1", token)
    assert again.status == 401 and "used" in again.text


def test_unknown_device_and_wrong_token_look_alike(live_server: LiveServer) -> None:
    live_server.mint_device("dev-2")
    wrong = enroll(live_server, "dev-2", "not-the-token")
    unknown = enroll(live_server, "nobody", "not-the-token")
    assert wrong.status == unknown.status == 401
    assert wrong.text == unknown.text == "unknown device or wrong enrollment token\n"
    assert wrong.headers["www-authenticate"].startswith("Basic realm=")
    assert snapshot(live_server, "dev-2") == (0, "provisioned", [])


def test_token_of_another_device_is_refused(live_server: LiveServer) -> None:
    token_a = live_server.mint_device("dev-a")
    live_server.mint_device("dev-b")
    r = enroll(live_server, "dev-b", token_a)
    assert r.status == 401
    # dev-a's token survived the attempt.
    assert enroll(live_server, "dev-a", token_a).status == 200


def test_expired_token(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-old", ttl=timedelta(seconds=-1))
    r = enroll(live_server, "dev-old", token)
    assert r.status == 401 and r.text == "enrollment token expired\n"
    assert snapshot(live_server, "dev-old") == (0, "provisioned", [])


def test_missing_and_malformed_auth(live_server: LiveServer) -> None:
    url = live_server.est_url + EST + "/simpleenroll"
    body = b64(csr_der(make_csr(generate_key(KeyType.EC_P256), "x")))
    r = request(url, live_server.client_ssl(), "POST", body, {"Content-Type": "application/pkcs10"})
    assert r.status == 401 and "HTTP Basic" in r.text and "www-authenticate" in r.headers
    r = request(
        url,
        live_server.client_ssl(),
        "POST",
        body,
        {"Content-Type": "application/pkcs10", "Authorization": "Basic !!!"},
    )
    assert r.status == 401


BAD_BODIES = {
    "malformed base64": (b"this is not base64 ***", 400, "not valid base64"),
    "DER garbage": (base64.b64encode(b"\x30\x82\x01\x00garbage"), 400, "not a DER-encoded PKCS#10"),
    "empty": (b"", 400, "empty body"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_bodies_burn_nothing(live_server: LiveServer, case: str) -> None:
    body, status, reason = BAD_BODIES[case]
    token = live_server.mint_device("dev-bad")
    r = request(
        live_server.est_url + EST + "/simpleenroll",
        live_server.client_ssl(),
        "POST",
        body,
        enroll_headers("dev-bad", token),
    )
    assert r.status == status and reason in r.text
    assert snapshot(live_server, "dev-bad") == (0, "provisioned", [])
    assert enroll(live_server, "dev-bad", token).status == 200  # the token still works


def _rsa1024_csr(cn: str) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _bad_sig_csr(cn: str) -> bytes:
    der = bytearray(csr_der(make_csr(generate_key(KeyType.EC_P256), cn)))
    der[-5] ^= 0xFF
    return bytes(der)


def _ext_csr(cn: str, ext: x509.ExtensionType) -> bytes:
    return csr_der(make_csr(generate_key(KeyType.EC_P256), cn, [(ext, False)]))


POLICY_CASES = {
    "bad signature": (_bad_sig_csr, "signature is invalid"),
    "weak key": (_rsa1024_csr, "1024 bits"),
    "CN mismatch": (
        lambda cn: csr_der(make_csr(generate_key(KeyType.EC_P256), "someone-else")),
        "does not match",
    ),
    "CA:TRUE": (
        lambda cn: _ext_csr(cn, x509.BasicConstraints(ca=True, path_length=None)),
        "CA:TRUE",
    ),
    "serverAuth": (
        lambda cn: _ext_csr(cn, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])),
        "serverAuth",
    ),
}


@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_csr_policy_rejections(live_server: LiveServer, case: str) -> None:
    make, reason = POLICY_CASES[case]
    token = live_server.mint_device("dev-pol")
    r = request(
        live_server.est_url + EST + "/simpleenroll",
        live_server.client_ssl(),
        "POST",
        b64(make("dev-pol")),
        enroll_headers("dev-pol", token),
    )
    assert r.status == 400, r.text
    assert reason in r.text and r.text.count("\n") == 1
    assert snapshot(live_server, "dev-pol") == (0, "provisioned", [])


def test_oversized_body_is_413(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-big")
    r = request(
        live_server.est_url + EST + "/simpleenroll",
        live_server.client_ssl(),
        "POST",
        b"A" * (200 * 1024),
        enroll_headers("dev-big", token),
    )
    assert r.status == 413
    assert snapshot(live_server, "dev-big") == (0, "provisioned", [])


def test_wrong_content_type_is_415(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-ct")
    body = b64(csr_der(make_csr(generate_key(KeyType.EC_P256), "dev-ct")))
    r = request(
        live_server.est_url + EST + "/simpleenroll",
        live_server.client_ssl(),
        "POST",
        body,
        {**basic("dev-ct", token), "Content-Type": "application/json"},
    )
    assert r.status == 415 and "application/pkcs10" in r.text


def race(
    server: LiveServer,
    device: str,
    token: str,
    clients: int = 8,
    *,
    others: tuple[LiveServer, ...] = (),
) -> list[int]:
    """`clients` simpleenrolls with one token, each with a key of its own, released at once
    (spread over `server` and `others`, nodes sharing its registry); asserts that exactly one
    got a certificate and the registry holds exactly one."""
    results: list[int] = []
    barrier = threading.Barrier(clients)
    nodes = (server, *others)

    def go(node: LiveServer) -> None:
        barrier.wait(5)
        results.append(enroll(node, device, token).status)

    threads = [threading.Thread(target=go, args=(nodes[i % len(nodes)],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results).count(200) == 1, results
    # Losers see 401 (token used) or, once they pile up, 429 from the brute-force throttle.
    assert all(s in (200, 401, 429) for s in results), results
    assert len(server.registry.certificates_of(DeviceId(device))) == 1
    return results


def test_concurrent_use_of_one_token_yields_one_certificate(live_server: LiveServer) -> None:
    race(live_server, "dev-race", live_server.mint_device("dev-race"))


def test_a_registry_locked_by_another_process_stalls_nothing_but_the_commit(
    live_server: LiveServer,
) -> None:
    """A CLI transaction holding the write lock (a big `batch create`) must not freeze the
    server: other requests are answered meanwhile, the enrollment gets its certificate once
    the lock is free, and nothing reaches the device before its certificate is recorded."""
    token = live_server.mint_device("dev-locked")
    holder = sqlite3.connect(live_server.layout.registry, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    replies: list[Reply] = []
    try:
        worker = threading.Thread(
            target=lambda: replies.append(enroll(live_server, "dev-locked", token))
        )
        worker.start()
        time.sleep(0.3)
        started = time.monotonic()
        cacerts = request(live_server.est_url + EST + "/cacerts", live_server.client_ssl())
        assert cacerts.status == 200
        assert time.monotonic() - started < 1.0  # not the registry's 5 s busy timeout
        assert replies == []  # the certificate is not recorded yet, so it is not sent
        assert live_server.registry.certificates_of(DeviceId("dev-locked")) == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    worker.join(15)
    (reply,) = replies
    assert reply.status == 200
    (record,) = live_server.registry.certificates_of(DeviceId("dev-locked"))
    assert record.serial == leaf(decode_certs_only(reply.body)).serial_number


def test_a_registry_locked_past_the_deadline_is_503_and_burns_nothing(
    live_server: LiveServer,
) -> None:
    token = live_server.mint_device("dev-busy")
    commits = live_server.handle.state.commits
    deadline, commits.busy_deadline = commits.busy_deadline, 0.3
    holder = sqlite3.connect(live_server.layout.registry, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        reply = enroll(live_server, "dev-busy", token)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        commits.busy_deadline = deadline
    assert reply.status == 503
    assert reply.headers.get("retry-after") == "5"
    assert "registry is locked" in reply.body.decode()
    # Nothing was issued and the token is still good: the retry the 503 asks for works.
    assert live_server.registry.certificates_of(DeviceId("dev-busy")) == []
    assert enroll(live_server, "dev-busy", token).status == 200
    assert len(live_server.registry.certificates_of(DeviceId("dev-busy"))) == 1


def _enrolled(
    live_server: LiveServer, tmp_path: Path, device: str
) -> tuple[Path, Path, x509.Certificate]:
    key = generate_key(KeyType.EC_P256)
    r = enroll(live_server, device, live_server.mint_device(device), key)
    assert r.status == 200
    cert = leaf(decode_certs_only(r.body))
    folder = tmp_path / device
    folder.mkdir()
    c, k = write_identity(folder, cert, key)
    return c, k, cert


def reenroll(live_server: LiveServer, cert: Path | None, key: Path | None, cn: str) -> Reply:
    body = b64(csr_der(make_csr(generate_key(KeyType.EC_P256), cn)))
    return request(
        live_server.est_url + EST + "/simplereenroll",
        live_server.client_ssl(cert, key),
        "POST",
        body,
        {"Content-Type": "application/pkcs10"},
    )


def test_simplereenroll_rotates_key_and_supersedes(live_server: LiveServer, tmp_path: Path) -> None:
    c, k, old = _enrolled(live_server, tmp_path, "dev-re")
    r = reenroll(live_server, c, k, "dev-re")
    assert r.status == 200, r.text
    new = leaf(decode_certs_only(r.body))
    assert new.serial_number != old.serial_number
    assert new.public_key() != old.public_key()
    assert live_server.registry.get_certificate(old.serial_number).status is CertStatus.SUPERSEDED  # type: ignore[union-attr]
    assert live_server.registry.get_certificate(new.serial_number).status is CertStatus.ACTIVE  # type: ignore[union-attr]
    # Power lost before the device stored `new`: it comes back with the superseded one, which
    # still re-enrolls (old or new identity works, never neither) ...
    again = reenroll(live_server, c, k, "dev-re")
    assert again.status == 200, again.text
    # ... until the device is revoked, which revokes superseded certificates too.
    live_server.registry.revoke_device(
        DeviceId("dev-re"), reason="keyCompromise", now=datetime.now(UTC), actor="test"
    )
    assert reenroll(live_server, c, k, "dev-re").status == 403


def test_reenroll_without_client_certificate(live_server: LiveServer) -> None:
    r = reenroll(live_server, None, None, "dev-x")
    assert r.status == 403 and "client authentication" in r.text


def test_reenroll_with_revoked_certificate(live_server: LiveServer, tmp_path: Path) -> None:
    c, k, _ = _enrolled(live_server, tmp_path, "dev-rv")
    live_server.registry.revoke_device(
        DeviceId("dev-rv"), reason="keyCompromise", now=datetime.now(UTC), actor="test"
    )
    before = snapshot(live_server, "dev-rv")
    r = reenroll(live_server, c, k, "dev-rv")
    assert r.status == 403 and r.text == "device dev-rv is revoked\n"
    assert snapshot(live_server, "dev-rv") == before


def test_reenroll_for_another_device(live_server: LiveServer, tmp_path: Path) -> None:
    c, k, _ = _enrolled(live_server, tmp_path, "dev-me")
    live_server.mint_device("dev-other")
    r = reenroll(live_server, c, k, "dev-other")
    assert r.status == 400 and "does not match the authenticated id 'dev-me'" in r.text
    assert snapshot(live_server, "dev-other") == (0, "provisioned", [])


def test_reenroll_with_expired_certificate_fails_tls(
    live_server: LiveServer, tmp_path: Path
) -> None:
    issuer = load_home(live_server.layout.root).issuer
    key = generate_key(KeyType.EC_P256)
    past = datetime.now(UTC) - timedelta(days=10)
    cert = build_device_certificate(
        key.public_key(),
        DeviceId("dev-exp"),
        issuer,
        past,
        DeviceProfile(validity=timedelta(days=1)),
    )
    c, k = write_identity(tmp_path, cert, key)
    # The TLS layer refuses it with the certificate_expired alert (RFC 8446 6.2), which the
    # listener flushes before closing, so the device learns why; nothing is issued.
    for _ in range(3):
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_EXPIRED"):
            reenroll(live_server, c, k, "dev-exp")
    text = live_server.metrics()
    assert 'fleetpki_est_tls_failures_total{reason="handshake"} 3' in text
    assert live_server.registry.get_device(DeviceId("dev-exp")) is None


def test_reenroll_with_foreign_ca_fails_tls(live_server: LiveServer, tmp_path: Path) -> None:
    from tests.pki_helpers import make_ca

    foreign = make_ca()
    cert, key = foreign.device_cert("dev-f")
    c, k = write_identity(tmp_path, cert, key)
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):  # the alert reaches the device
        reenroll(live_server, c, k, "dev-f")


def test_revoked_device_cannot_simpleenroll(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-gone")
    live_server.registry.revoke_device(
        DeviceId("dev-gone"), reason="keyCompromise", now=datetime.now(UTC), actor="test"
    )
    r = enroll(live_server, "dev-gone", token)
    assert r.status == 403 and "revoked" in r.text
    assert snapshot(live_server, "dev-gone") == (0, "revoked", [])


def test_metrics_and_health(live_server: LiveServer) -> None:
    token = live_server.mint_device("dev-m")
    assert enroll(live_server, "dev-m", token).status == 200
    assert enroll(live_server, "dev-m", token).status == 401
    text = live_server.metrics()
    assert 'fleetpki_enrollments_total{result="simpleenroll_ok"} 1' in text
    assert 'fleetpki_enrollments_total{result="rejected_401"} 1' in text
    assert "fleetpki_enroll_seconds_count 1" in text
    assert request(live_server.http_url + "/healthz", None).status == 200
