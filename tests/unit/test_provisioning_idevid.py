"""IDevID: manufacturer CA, birth certificates, CSR lists, IDevID batches and the service's
bootstrap authorization (real CA, real SQLite, no HTTP)."""

from __future__ import annotations

import base64
import stat
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enroll_server.enrollment.manufacturers import TrustedManufacturers
from enroll_server.enrollment.service import EnrollmentService
from enroll_server.errors import BadRequest, DeviceRevoked, Forbidden
from enroll_server.home.config import load_config
from enroll_server.home.layout import HomeLayout, load_home
from enroll_server.pki.errors import BadPassphrase, BirthCertificateRejected
from enroll_server.pki.keys import KeyType, generate_key, load_private_key_pem
from enroll_server.pki.profile import DeviceProfile
from enroll_server.registry import BatchKind, CertStatus, DeviceState, Registry
from fleetpki.identity import DeviceId
from provisioning.batch import BatchRequest, IdevidOptions, create_batch
from provisioning.csr_list import scan_csr_list
from provisioning.errors import CsrListError, InvalidBatchOption
from provisioning.idevid import build_birth_certificate, check_birth_certificate
from provisioning.lifecycle import revoke_batch
from provisioning.manufacturer import (
    ManufacturerCa,
    build_manufacturer_ca,
    load_or_create_manufacturer,
    trusted_manufacturer_ca_files,
)
from tests.live_server import make_home
from tests.pki_helpers import MemoryCa, csr_der, make_csr

NOW = datetime.now(UTC).replace(microsecond=0)
DEV = DeviceId("sn-0001")


@pytest.fixture
def layout(tmp_path: Path) -> HomeLayout:
    return make_home(tmp_path / "home")


@pytest.fixture
def registry(layout: HomeLayout) -> Iterator[Registry]:
    with Registry.open(layout.registry) as reg:
        yield reg


@pytest.fixture(scope="module")
def mca() -> ManufacturerCa:
    key = generate_key(KeyType.EC_P256)
    return ManufacturerCa("acme", build_manufacturer_ca(key, "acme", NOW), key)


def test_manufacturer_ca_created_once_encrypted_and_listed(layout: HomeLayout) -> None:
    assert trusted_manufacturer_ca_files(layout.root) == []
    first = load_or_create_manufacturer(layout, "acme", NOW)
    again = load_or_create_manufacturer(layout, "acme", NOW)
    assert first.cert == again.cert
    folder = layout.root / "manufacturers" / "acme"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "ca.key").stat().st_mode) == 0o600
    with pytest.raises(BadPassphrase):
        load_private_key_pem((folder / "ca.key").read_bytes(), None)
    assert trusted_manufacturer_ca_files(layout.root) == [folder / "ca.pem"]
    basic = first.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    # A separate root: not the fleet's CA.
    assert first.cert.issuer == first.cert.subject
    assert (
        first.cert.subject != x509.load_pem_x509_certificate(layout.root_cert.read_bytes()).subject
    )


def test_birth_certificate_profile_and_check(mca: ManufacturerCa) -> None:
    key = generate_key(KeyType.EC_P256)
    cert = build_birth_certificate(key.public_key(), DEV, "lot-1", mca, NOW)
    subject = {a.oid: a.value for a in cert.subject}
    assert subject[NameOID.COMMON_NAME] == "sn-0001"
    assert subject[NameOID.SERIAL_NUMBER] == "sn-0001"
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "lot-1"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [DEV.urn]
    birth = check_birth_certificate(cert, [mca.cert], NOW)
    assert (birth.device_id, birth.lot) == (DEV, "lot-1")


def test_fleet_certificate_is_not_a_birth_certificate(ca: MemoryCa, mca: ManufacturerCa) -> None:
    cert, _ = ca.device_cert("sn-0001")
    with pytest.raises(BirthCertificateRejected, match="manufacturer CA"):
        check_birth_certificate(cert, [mca.cert], NOW)


def test_forged_manufacturer_with_same_name(mca: ManufacturerCa) -> None:
    key = generate_key(KeyType.EC_P256)
    impostor = ManufacturerCa("acme", build_manufacturer_ca(key, "acme", NOW), key)
    assert impostor.cert.subject == mca.cert.subject
    cert = build_birth_certificate(key.public_key(), DEV, "lot-1", impostor, NOW)
    with pytest.raises(BirthCertificateRejected, match="manufacturer CA"):
        check_birth_certificate(cert, [mca.cert], NOW)


def test_expired_and_malformed_birth_certificates(mca: ManufacturerCa) -> None:
    key = generate_key(KeyType.EC_P256)
    cert = build_birth_certificate(key.public_key(), DEV, "lot-1", mca, NOW)
    with pytest.raises(BirthCertificateRejected, match="expired"):
        check_birth_certificate(cert, [mca.cert], NOW + timedelta(days=365 * 30))

    def custom(names: list[x509.NameAttribute]) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name(names))
            .issuer_name(mca.cert.subject)
            .public_key(key.public_key())
            .serial_number(7)
            .not_valid_before(NOW - timedelta(hours=1))
            .not_valid_after(NOW + timedelta(days=1))
            .sign(mca.key, hashes.SHA256())
        )

    cn = x509.NameAttribute(NameOID.COMMON_NAME, "sn-0001")
    ou = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "lot-1")
    with pytest.raises(BirthCertificateRejected, match="serialNumber"):
        check_birth_certificate(custom([ou, cn]), [mca.cert], NOW)
    other = x509.NameAttribute(NameOID.SERIAL_NUMBER, "sn-0002")
    with pytest.raises(BirthCertificateRejected, match="differ"):
        check_birth_certificate(custom([ou, other, cn]), [mca.cert], NOW)
    same = x509.NameAttribute(NameOID.SERIAL_NUMBER, "sn-0001")
    with pytest.raises(BirthCertificateRejected, match="OU"):
        check_birth_certificate(custom([same, cn]), [mca.cert], NOW)
    bad = x509.NameAttribute(NameOID.COMMON_NAME, "../x")
    with pytest.raises(BirthCertificateRejected):
        check_birth_certificate(
            custom([ou, x509.NameAttribute(NameOID.SERIAL_NUMBER, "../x"), bad]), [mca.cert], NOW
        )


def csr_pem(device: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    der = csr_der(make_csr(key, device))
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


def test_csr_list_scan(tmp_path: Path) -> None:
    path = tmp_path / "csrs.pem"
    path.write_bytes(b"factory export\n" + csr_pem("sn-1") + b"\n" + csr_pem("sn-2"))
    csrs = scan_csr_list(path)
    assert csrs.count == 2
    assert [d.value for d, _ in csrs.entries()] == ["sn-1", "sn-2"]


@pytest.mark.parametrize("case", ["duplicate", "bad-cn", "curve", "garbage", "empty", "sig"])
def test_bad_csr_lists(tmp_path: Path, case: str) -> None:
    good = csr_pem("sn-1")
    body = {
        "duplicate": good + csr_pem("sn-1"),
        "bad-cn": good + csr_pem("sn 2"),
        "curve": good + csr_pem("sn-3", ec.generate_private_key(ec.SECP521R1())),
        "garbage": good
        + b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "empty": b"nothing here\n",
        "sig": good,
    }[case]
    if case == "sig":
        # Flip a byte inside the signature: the CSR still parses, its self-signature fails.
        csr = x509.load_pem_x509_csr(good)
        der = bytearray(csr.public_bytes(serialization.Encoding.DER))
        der[-5] ^= 0x01
        b64 = base64.encodebytes(bytes(der))
        body = (
            b"-----BEGIN CERTIFICATE REQUEST-----\n" + b64 + b"-----END CERTIFICATE REQUEST-----\n"
        )
    path = tmp_path / "csrs.pem"
    path.write_bytes(body)
    with pytest.raises(CsrListError) as info:
        scan_csr_list(path)
    if case not in ("empty", "sig"):
        assert info.value.index == 2
    if case == "sig":
        assert "signature is invalid" in str(info.value)
    assert "nothing was created" in str(info.value)


def idevid_batch(
    layout: HomeLayout, registry: Registry, out: Path, **kw: object
) -> tuple[str, Path]:
    request = BatchRequest(out_dir=out, idevid=IdevidOptions("acme", **kw), **_req(kw))  # type: ignore[arg-type]
    result = create_batch(registry, layout, load_config(layout.config), request, now=NOW, actor="t")
    return result.batch_id, out


def _req(kw: dict[str, object]) -> dict[str, object]:
    return {} if "csrs" in kw else {"count": 3, "prefix": "sn-"}


def test_idevid_batch_with_generated_keys(
    layout: HomeLayout, registry: Registry, tmp_path: Path
) -> None:
    batch_id, out = idevid_batch(layout, registry, tmp_path / "lot")
    batch = registry.get_batch(batch_id)
    assert batch is not None and batch.kind is BatchKind.IDEVID
    folder = out / "sn-000001"
    assert sorted(p.name for p in folder.iterdir()) == [
        "agent.toml",
        "ca.pem",
        "idevid.key",
        "idevid.pem",
    ]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    doc = tomllib.loads((folder / "agent.toml").read_text())
    assert doc["enroll"]["idevid_cert"] == "idevid.pem" and "token_file" not in doc["enroll"]
    cert = x509.load_pem_x509_certificate((folder / "idevid.pem").read_bytes())
    key = load_private_key_pem((folder / "idevid.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()
    mca = x509.load_pem_x509_certificate(trusted_manufacturer_ca_files(layout.root)[0].read_bytes())
    birth = check_birth_certificate(cert, [mca], NOW)
    assert (birth.device_id.value, birth.lot) == ("sn-000001", batch_id)
    assert registry.batch_counts(batch_id, NOW)["provisioned"] == 3
    rows = (out / "manifest.csv").read_text().splitlines()
    assert rows[1] == "sn-000001,sn-000001,"


def test_idevid_batch_from_factory_csrs(
    layout: HomeLayout, registry: Registry, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csrs = tmp_path / "csrs.pem"
    csrs.write_bytes(csr_pem("fac-a", key) + csr_pem("fac-b"))
    _, out = idevid_batch(layout, registry, tmp_path / "lot", csrs=csrs)
    assert sorted(p.name for p in (out / "fac-a").iterdir()) == [
        "agent.toml",
        "ca.pem",
        "idevid.pem",
    ]
    cert = x509.load_pem_x509_certificate((out / "fac-a" / "idevid.pem").read_bytes())
    assert cert.public_key() == key.public_key()
    with pytest.raises(InvalidBatchOption, match="count"):
        create_batch(
            registry,
            layout,
            load_config(layout.config),
            BatchRequest(count=2, out_dir=tmp_path / "x", idevid=IdevidOptions("acme", csrs)),
            now=NOW,
            actor="t",
        )


def birth_identity(out: Path, device: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((out / device / "idevid.pem").read_bytes())


def enroll_csr(device: str) -> bytes:
    """The operational key is a new one (the agent never reuses the birth key for it)."""
    return csr_der(make_csr(generate_key(KeyType.EC_P256), device))


@pytest.fixture
def service(layout: HomeLayout, registry: Registry) -> EnrollmentService:
    trusted = TrustedManufacturers(layout.root)
    return EnrollmentService(
        registry, load_home(layout.root).issuer, DeviceProfile(), manufacturers=trusted.current
    )


def test_service_bootstrap_with_birth_certificate(
    layout: HomeLayout, registry: Registry, service: EnrollmentService, tmp_path: Path
) -> None:
    batch_id, out = idevid_batch(layout, registry, tmp_path / "lot")
    cert = birth_identity(out, "sn-000001")
    auth = service.authorize_bootstrap_certificate(cert, NOW)
    assert auth.grant.device_id == DeviceId("sn-000001") and auth.token_hash is None
    first = service.enroll(enroll_csr("sn-000001"), auth, NOW)
    assert registry.get_device(DeviceId("sn-000001")).state is DeviceState.ACTIVE  # type: ignore[union-attr]
    # An IDevID enrolls only its own id: a CSR for another device is refused by the grant.
    with pytest.raises(BadRequest, match="does not match"):
        service.enroll(enroll_csr("sn-000002"), auth, NOW)
    # Factory reset: the same birth certificate bootstraps again with a new key; the old
    # certificate (whose key the reset wiped) is cut off at once, reason superseded.
    again = service.authorize_bootstrap_certificate(cert, NOW)
    second = service.enroll(enroll_csr("sn-000001"), again, NOW)
    statuses = {
        c.serial: (c.status, c.revocation_reason)
        for c in registry.certificates_of(DeviceId("sn-000001"))
    }
    assert statuses == {
        first.certificate.serial_number: (CertStatus.REVOKED, "superseded"),
        second.certificate.serial_number: (CertStatus.ACTIVE, None),
    }
    # The lot is revoked: every birth certificate of it stops working at once.
    assert revoke_batch(registry, batch_id, reason="key-compromise", now=NOW, actor="t") == 3
    with pytest.raises(DeviceRevoked):
        service.authorize_bootstrap_certificate(birth_identity(out, "sn-000002"), NOW)


def test_service_refuses_foreign_and_misplaced_birth_certificates(
    layout: HomeLayout,
    registry: Registry,
    service: EnrollmentService,
    tmp_path: Path,
    ca: MemoryCa,
) -> None:
    idevid_batch(layout, registry, tmp_path / "lot")
    mca = load_or_create_manufacturer(layout, "acme", NOW)
    key = generate_key(KeyType.EC_P256)
    # A fleet (operational) certificate is not a birth certificate.
    fleet, _ = ca.device_cert("sn-000001")
    with pytest.raises(Forbidden, match="manufacturer"):
        service.authorize_bootstrap_certificate(fleet, NOW)
    # Genuine manufacturer signature, but made for another lot than the device's.
    wrong_lot = build_birth_certificate(key.public_key(), DeviceId("sn-000001"), "lot-x", mca, NOW)
    with pytest.raises(Forbidden, match="another lot"):
        service.authorize_bootstrap_certificate(wrong_lot, NOW)
    # A device of a token batch cannot bootstrap with a birth certificate.
    create_batch(
        registry,
        layout,
        load_config(layout.config),
        BatchRequest(count=1, prefix="tok-", out_dir=tmp_path / "tok", batch_id="tok-lot"),
        now=NOW,
        actor="t",
    )
    token_dev = build_birth_certificate(
        key.public_key(), DeviceId("tok-000001"), "tok-lot", mca, NOW
    )
    with pytest.raises(Forbidden, match="no such IDevID device"):
        service.authorize_bootstrap_certificate(token_dev, NOW)
    unknown = build_birth_certificate(key.public_key(), DeviceId("ghost"), "lot-x", mca, NOW)
    with pytest.raises(Forbidden, match="no such IDevID device"):
        service.authorize_bootstrap_certificate(unknown, NOW)
    # Removing the manufacturer CA file from the home cuts its certificates off at once.
    cert = birth_identity(tmp_path / "lot", "sn-000003")
    for path in trusted_manufacturer_ca_files(layout.root):
        path.unlink()
    with pytest.raises(Forbidden, match="manufacturer"):
        service.authorize_bootstrap_certificate(cert, NOW)


def test_trusted_manufacturers_follow_the_folder(layout: HomeLayout) -> None:
    """Added CA: trusted and loaded into the TLS context; removed CA: no longer trusted."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trusted = TrustedManufacturers(layout.root, [ctx])
    assert trusted.current() == {}
    acme = load_or_create_manufacturer(layout, "acme", NOW)
    assert trusted.current() == {"acme": acme.cert}
    anchors = ctx.cert_store_stats()["x509_ca"]
    assert anchors == 1
    other = load_or_create_manufacturer(layout, "other", NOW)
    assert trusted.current() == {"acme": acme.cert, "other": other.cert}
    assert ctx.cert_store_stats()["x509_ca"] == 2
    (layout.root / "manufacturers" / "acme" / "ca.pem").unlink()
    assert trusted.current() == {"other": other.cert}
