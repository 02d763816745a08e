"""Who a client certificate is, over real EST: a manufacturer (IDevID) CA, which the EST
listener trusts for birth certificates, cannot mint a fleet identity by copying the CN and
serial (public through OCSP and the CRL) of a service's or a device's certificate."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enroll_server.enrollment.identities import issue_service_identity
from enroll_server.est.wire import decode_certs_only
from enroll_server.pki.keys import (
    KeyType,
    PrivateKey,
    generate_key,
    private_key_pem,
    signature_hash,
)
from enroll_server.pki.profile import SIGNATURE_ONLY_KEY_USAGE
from enroll_server.registry import Registry
from fleetpki.identity import SERVICE_URN_PREFIX, URN_PREFIX, DeviceId
from provisioning.manufacturer import ManufacturerCa, load_or_create_manufacturer
from tests.est_client import Reply, enroll_headers, request
from tests.live_server import LiveServer, make_home, start_live_server
from tests.pki_helpers import csr_der, make_csr

EST = "/.well-known/est"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[LiveServer, ManufacturerCa]]:
    """A home with a manufacturer CA (so the EST TLS layer trusts it), the service running."""
    layout = make_home(tmp_path / "home")
    mca = load_or_create_manufacturer(layout, "acme", datetime.now(UTC))
    live = start_live_server(tmp_path / "home")
    try:
        yield live, mca
    finally:
        live.stop()


def forge(genuine: x509.Certificate, mca: ManufacturerCa, key: PrivateKey) -> x509.Certificate:
    """A copy of `genuine`'s identity (subject, serial, SAN URI, clientAuth) signed by the
    manufacturer CA over `key`, without an AKI (one naming our issuing CA's key would not
    chain to the manufacturer CA in TLS)."""
    return (
        x509.CertificateBuilder()
        .subject_name(genuine.subject)
        .issuer_name(mca.cert.subject)
        .public_key(key.public_key())
        .serial_number(genuine.serial_number)
        .not_valid_before(datetime.now(UTC) - timedelta(hours=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SIGNATURE_ONLY_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            genuine.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
            critical=False,
        )
        .sign(mca.key, signature_hash(mca.key))
    )


def write_pair(folder: Path, cert: x509.Certificate, key: PrivateKey) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_key_pem(key, None))
    return cert_path, key_path


def reenroll(live: LiveServer, cert: Path, key: Path, cn: str) -> Reply:
    body = csr_der(make_csr(generate_key(KeyType.EC_P256), cn))
    return request(
        live.est_url + EST + "/simplereenroll",
        live.client_ssl(cert, key),
        "POST",
        base64.b64encode(body),
        {"Content-Type": "application/pkcs10"},
    )


def certificate_count(live: LiveServer, identity: str) -> int:
    return len(live.registry.certificates_of(DeviceId(identity)))


def test_manufacturer_ca_cannot_mint_a_service_identity(
    stack: tuple[LiveServer, ManufacturerCa], tmp_path: Path
) -> None:
    live, mca = stack
    svc = issue_service_identity(live.layout.root, "backend", None, datetime.now(UTC))
    genuine = x509.load_pem_x509_certificate(svc.cert.read_bytes())
    san = genuine.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        SERVICE_URN_PREFIX + "backend"
    ]
    key = generate_key(KeyType.EC_P256)
    forged = forge(genuine, mca, key)
    cert, key_path = write_pair(tmp_path / "forged", forged, key)
    reply = reenroll(live, cert, key_path, "backend")
    assert reply.status == 403, reply.text
    assert "not issued by this CA's issuing CA" in reply.text
    assert reply.headers["fleetpki-error"] == "forbidden"
    assert certificate_count(live, "backend") == 1
    # The genuine certificate still renews.
    ok = reenroll(live, svc.cert, svc.folder / "key.pem", "backend")
    assert ok.status == 200, ok.text


def test_manufacturer_ca_cannot_mint_a_device_identity(
    stack: tuple[LiveServer, ManufacturerCa], tmp_path: Path
) -> None:
    live, mca = stack
    token = live.mint_device("dev-1")
    device_key = generate_key(KeyType.EC_P256)
    reply = request(
        live.est_url + EST + "/simpleenroll",
        live.client_ssl(),
        "POST",
        base64.b64encode(csr_der(make_csr(device_key, "dev-1"))),
        enroll_headers("dev-1", token),
    )
    assert reply.status == 200, reply.text
    (genuine,) = [
        c
        for c in decode_certs_only(reply.body)
        if c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    ]
    san = genuine.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [URN_PREFIX + "dev-1"]
    key = generate_key(KeyType.EC_P256)
    cert, key_path = write_pair(tmp_path / "forged", forge(genuine, mca, key), key)
    assert reenroll(live, cert, key_path, "dev-1").status == 403
    # The device status endpoint asks the same question and gives the same answer.
    status = request(live.est_url + "/device/status", live.client_ssl(cert, key_path))
    assert status.status == 403, status.text
    assert certificate_count(live, "dev-1") == 1
    with Registry.open(live.layout.registry) as registry:
        assert registry.get_certificate(genuine.serial_number) is not None
