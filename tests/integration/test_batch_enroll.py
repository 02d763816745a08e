"""Factory bundles against the real service on 127.0.0.1: the agent's EST client enrolls with a
bundle as written; token policy (binding, reuse, expiry, throttling, reissue, lot revocation);
IDevID bootstrap over real mTLS with a birth certificate."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from device_agent.config import AgentConfig, load_config
from device_agent.errors import EstRejected
from device_agent.est_client import EstClient
from device_agent.est_wire import build_csr
from device_agent.keys import KeyType, generate_key
from enroll_server.est.wire import decode_certs_only
from enroll_server.home.config import load_config as load_server_config
from enroll_server.home.layout import HomeLayout
from enroll_server.pki import keys as pki_keys
from enroll_server.registry import DeviceState, Registry
from fleetpki.identity import DeviceId
from provisioning.batch import BatchRequest, IdevidOptions, create_batch
from provisioning.idevid import build_birth_certificate
from provisioning.lifecycle import reissue_token, revoke_batch
from provisioning.manufacturer import load_or_create_manufacturer, trusted_manufacturer_ca_files
from tests.est_client import Reply, enroll_headers, request
from tests.live_server import LiveServer, make_home, start_live_server
from tests.pki_helpers import csr_der, make_csr

EST = "/.well-known/est"


class Clock:
    """The server's clock, movable by the test (token expiry without sleeping)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(tmp_path: Path, clock: Clock) -> Iterator[LiveServer]:
    live = start_live_server(tmp_path / "home", clock=clock)
    try:
        yield live
    finally:
        live.stop()


def make_batch(server: LiveServer, out: Path, count: int = 3, **kw: object) -> str:
    layout = server.layout
    result = create_batch(
        server.registry,
        layout,
        load_server_config(layout.config),
        BatchRequest(count=count, out_dir=out, **kw),  # type: ignore[arg-type]
        now=datetime.now(UTC),
        actor="test",
    )
    return result.batch_id


def agent_config(server: LiveServer, bundle: Path) -> AgentConfig:
    """The bundle's agent.toml, read by the agent's own loader; only the port is the test's."""
    cfg = load_config(bundle / "agent.toml")
    server_url = dataclasses.replace(cfg.server, port=server.handle.est_port, url=server.est_url)
    return dataclasses.replace(cfg, server=server_url)


def leaf(certs: list[x509.Certificate]) -> x509.Certificate:
    (ee,) = [
        c for c in certs if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ]
    return ee


def cn_of(cert: x509.Certificate) -> object:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def enroll_with_bundle(
    server: LiveServer, bundle: Path, token: str | None = None
) -> list[x509.Certificate]:
    cfg = agent_config(server, bundle)
    key = generate_key(KeyType(cfg.key_type.value))
    csr = build_csr(key, cfg.device_id)
    client = EstClient(cfg.server, cfg.trust_anchor, timeout=15)
    secret = token if token is not None else cfg.token_file.read_text().strip()
    return asyncio.run(client.simpleenroll(csr, cfg.device_id, secret))


def test_bundle_enrolls_as_written(server: LiveServer, tmp_path: Path) -> None:
    batch_id = make_batch(server, tmp_path / "lot")
    certs = enroll_with_bundle(server, tmp_path / "lot" / "dev-000002")
    assert cn_of(leaf(certs)) == "dev-000002"
    counts = server.registry.batch_counts(batch_id, datetime.now(UTC))
    assert (counts["enrolled"], counts["provisioned"]) == (1, 2)


def raw_enroll(server: LiveServer, device: str, token: str) -> Reply:
    body = base64.b64encode(csr_der(make_csr(generate_key(KeyType.EC_P256), device)))
    return request(
        server.est_url + EST + "/simpleenroll",
        server.client_ssl(),
        "POST",
        body,
        enroll_headers(device, token),
    )


def token_of(lot: Path, device: str) -> str:
    return (lot / device / "token").read_text().strip()


def test_token_policy_binding_reuse_and_lookalike_errors(
    server: LiveServer, tmp_path: Path
) -> None:
    lot = tmp_path / "lot"
    make_batch(server, lot)
    t1, t2 = token_of(lot, "dev-000001"), token_of(lot, "dev-000002")
    # Bound to its device: device 2's token does not enroll device 1, and the answer reads
    # exactly like an unknown device (no enumeration oracle).
    wrong_device = raw_enroll(server, "dev-000001", t2)
    unknown = raw_enroll(server, "dev-999999", t2)
    wrong_token = raw_enroll(server, "dev-000001", "A" * 43)
    assert wrong_device.status == unknown.status == wrong_token.status == 401
    assert wrong_device.body == unknown.body == wrong_token.body
    assert raw_enroll(server, "dev-000001", t1).status == 200
    # One-time: reuse is refused.
    again = raw_enroll(server, "dev-000001", t1)
    assert again.status == 401 and "used" in again.text


def test_expired_token_is_refused(server: LiveServer, tmp_path: Path, clock: Clock) -> None:
    lot = tmp_path / "lot"
    make_batch(server, lot, token_ttl=timedelta(hours=1))
    clock.now = datetime.now(UTC) + timedelta(hours=2)
    with pytest.raises(EstRejected) as info:
        enroll_with_bundle(server, lot / "dev-000001")
    assert info.value.status == 401 and "expired" in info.value.reason
    device = server.registry.get_device(DeviceId("dev-000001"))
    assert device is not None and device.state is DeviceState.PROVISIONED


def test_guessing_is_throttled_per_device_but_the_right_token_enrolls(
    server: LiveServer, tmp_path: Path
) -> None:
    """Ids are sequential: anyone can name a device. Wrong guesses against it are throttled
    (401 five times, then 429), the device's own token still enrolls at once."""
    lot = tmp_path / "lot"
    make_batch(server, lot, count=1)
    statuses = [raw_enroll(server, "dev-000001", f"guess{i:038d}").status for i in range(8)]
    assert statuses[:5] == [401] * 5
    assert set(statuses[5:]) == {429}
    assert raw_enroll(server, "dev-000001", token_of(lot, "dev-000001")).status == 200


def test_a_guesser_behind_the_same_address_does_not_lock_out_honest_devices(
    server: LiveServer, tmp_path: Path
) -> None:
    """25 failures from 127.0.0.1 (over the 20 per source), then another device behind the
    same address enrolls with its correct token; the guesser keeps getting 429."""
    lot = tmp_path / "lot"
    make_batch(server, lot, count=3)
    statuses = [raw_enroll(server, f"dev-{i:06d}", "wrong-token").status for i in range(10, 35)]
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    assert raw_enroll(server, "dev-000002", token_of(lot, "dev-000002")).status == 200
    assert raw_enroll(server, "dev-000099", "wrong-token").status == 429
    enroll_with_bundle(server, lot / "dev-000003")  # the agent's own client, same address


def test_failed_logins_take_bounded_memory(server: LiveServer, tmp_path: Path) -> None:
    """A malformed login (here 5 KB, so the field stays under the 8190-byte line limit past
    which aiohttp answers 400 itself) is counted for its source only, never stored;
    well-formed ids beyond the table's cap evict the oldest instead of growing it."""
    throttle = server.handle.state.throttle
    body = base64.b64encode(csr_der(make_csr(generate_key(KeyType.EC_P256), "dev-000001")))
    url = server.est_url + EST + "/simpleenroll"
    for i in range(30):
        login = f"{i}" + "x" * 5000
        reply = request(url, server.client_ssl(), "POST", body, enroll_headers(login, "t"))
        assert reply.status in (401, 429)
    assert len(throttle) == 1  # the source alone
    throttle.max_keys = 10
    for i in range(40):
        assert raw_enroll(server, f"ghost-{i}", "t").status in (401, 429)
    assert len(throttle) == 10
    assert max(len(k) for k in throttle._by_key) < 80


def test_reissued_token_replaces_the_old(server: LiveServer, tmp_path: Path) -> None:
    lot = tmp_path / "lot"
    make_batch(server, lot, count=2)
    old = token_of(lot, "dev-000001")
    layout = server.layout
    reissue_token(
        server.registry,
        layout,
        load_server_config(layout.config),
        DeviceId("dev-000001"),
        ttl=None,
        now=datetime.now(UTC),
        out_dir=lot,
        force=True,
    )
    assert raw_enroll(server, "dev-000001", old).status == 401
    enroll_with_bundle(server, lot / "dev-000001")


def test_revoked_lot_cannot_enroll(server: LiveServer, tmp_path: Path) -> None:
    lot = tmp_path / "lot"
    batch_id = make_batch(server, lot, count=3)
    enroll_with_bundle(server, lot / "dev-000001")
    revoke_batch(
        server.registry, batch_id, reason="key-compromise", now=datetime.now(UTC), actor="t"
    )
    with pytest.raises(EstRejected) as info:
        enroll_with_bundle(server, lot / "dev-000002")
    assert info.value.status == 403


# ------------------------------------------------------------------------------ IDevID


def idevid_lot(
    layout: HomeLayout, out: Path, manufacturer: str = "acme", prefix: str = "sn-"
) -> str:
    """`fleetpki batch create --idevid --manufacturer M --count 3 --prefix P --out OUT`."""
    with Registry.open(layout.registry) as registry:
        return create_batch(
            registry,
            layout,
            load_server_config(layout.config),
            BatchRequest(count=3, prefix=prefix, out_dir=out, idevid=IdevidOptions(manufacturer)),
            now=datetime.now(UTC),
            actor="test",
        ).batch_id


@pytest.fixture
def idevid_server(tmp_path: Path) -> Iterator[tuple[LiveServer, Path, str]]:
    """A service on a home with an IDevID lot of manufacturer acme (its TLS layer trusts the
    manufacturer CA for client certificates)."""
    home = tmp_path / "home"
    layout = make_home(home)
    lot = tmp_path / "lot"
    batch_id = idevid_lot(layout, lot)
    live = start_live_server(home)
    try:
        yield live, lot, batch_id
    finally:
        live.stop()


def birth_enroll(server: LiveServer, bundle: Path, cn: str | None = None) -> Reply:
    ctx = server.client_ssl(bundle / "idevid.pem", bundle / "idevid.key")
    body = base64.b64encode(csr_der(make_csr(generate_key(KeyType.EC_P256), cn or bundle.name)))
    return request(
        server.est_url + EST + "/simpleenroll",
        ctx,
        "POST",
        body,
        {"Content-Type": "application/pkcs10"},
    )


def test_idevid_bootstrap_over_mtls(idevid_server: tuple[LiveServer, Path, str]) -> None:
    server, lot, batch_id = idevid_server
    reply = birth_enroll(server, lot / "sn-000001")
    assert reply.status == 200, reply.text
    ee = leaf(decode_certs_only(reply.body))
    assert cn_of(ee) == "sn-000001"
    # Issued by the fleet's issuing CA, not the manufacturer.
    issuer_cn = ee.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert issuer_cn == "fleetpki Issuing CA"
    # An IDevID enrolls only its own device id.
    other = birth_enroll(server, lot / "sn-000002", cn="sn-000003")
    assert other.status == 400 and "does not match" in other.text
    # The whole manufacturer lot is revoked: its birth certificates stop working at once.
    revoke_batch(
        server.registry, batch_id, reason="key-compromise", now=datetime.now(UTC), actor="t"
    )
    refused = birth_enroll(server, lot / "sn-000003")
    assert refused.status == 403 and "revoked" in refused.text


def test_removing_a_manufacturer_ca_cuts_it_off_while_serving(
    idevid_server: tuple[LiveServer, Path, str],
) -> None:
    """The CA file is the trust: deleted while the server runs, the next birth certificate of
    that manufacturer is refused (the TLS handshake still completes: OpenSSL cannot drop a
    trust anchor from a live context; the service's check refuses it)."""
    server, lot, _ = idevid_server
    enrolled = birth_enroll(server, lot / "sn-000001")
    assert enrolled.status == 200
    acme = load_or_create_manufacturer(server.layout, "acme", datetime.now(UTC))
    for path in trusted_manufacturer_ca_files(server.layout.root):
        path.unlink()
    refused = birth_enroll(server, lot / "sn-000002")
    assert refused.status == 403, refused.text
    assert "not issued by a manufacturer CA" in refused.text
    assert server.registry.certificates_of(DeviceId("sn-000002")) == []
    # Nor does the removed CA get anything through re-enrollment: a copy of sn-000001's
    # fleet certificate (subject, serial, SAN) signed by it passes the TLS handshake, which
    # still trusts the CA, and is refused by the service.
    fleet = leaf(decode_certs_only(enrolled.body))
    key = pki_keys.generate_key(pki_keys.KeyType.EC_P256)
    copy = (
        x509.CertificateBuilder()
        .subject_name(fleet.subject)
        .issuer_name(acme.cert.subject)
        .public_key(key.public_key())
        .serial_number(fleet.serial_number)
        .not_valid_before(fleet.not_valid_before_utc)
        .not_valid_after(fleet.not_valid_after_utc)
        .add_extension(fleet.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value, False)
        .add_extension(
            fleet.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False
        )
        .sign(acme.key, pki_keys.signature_hash(acme.key))
    )
    cert_path, key_path = server.layout.root / "copy.pem", server.layout.root / "copy.key"
    cert_path.write_bytes(copy.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(pki_keys.private_key_pem(key, None))
    body = base64.b64encode(
        csr_der(make_csr(pki_keys.generate_key(pki_keys.KeyType.EC_P256), "sn-000001"))
    )
    reply = request(
        server.est_url + EST + "/simplereenroll",
        server.client_ssl(cert_path, key_path),
        "POST",
        body,
        {"Content-Type": "application/pkcs10"},
    )
    assert reply.status == 403, reply.text
    assert len(server.registry.certificates_of(DeviceId("sn-000001"))) == 1


def test_a_lot_enrolls_only_with_its_own_manufacturer(tmp_path: Path) -> None:
    """Factory B's genuine birth certificate naming factory A's lot (OU) is refused: each
    IDevID lot is bound to the manufacturer it was made with."""
    home = tmp_path / "home"
    layout = make_home(home)
    lot_a = idevid_lot(layout, tmp_path / "a", manufacturer="factory-a", prefix="a-")
    idevid_lot(layout, tmp_path / "b", manufacturer="factory-b", prefix="b-")
    with Registry.open(layout.registry) as registry:
        batch = registry.get_batch(lot_a)
        assert batch is not None and batch.manufacturer == "factory-a"
    factory_b = load_or_create_manufacturer(layout, "factory-b", datetime.now(UTC))
    key = pki_keys.generate_key(pki_keys.KeyType.EC_P256)
    forged = build_birth_certificate(
        key.public_key(), DeviceId("a-000001"), lot_a, factory_b, datetime.now(UTC)
    )
    bundle = tmp_path / "forged"
    bundle.mkdir()
    (bundle / "idevid.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    (bundle / "idevid.key").write_bytes(pki_keys.private_key_pem(key, None))
    server = start_live_server(home)
    try:
        refused = birth_enroll(server, bundle, cn="a-000001")
        assert refused.status == 403, refused.text
        assert "was not signed by manufacturer factory-a" in refused.text
        assert server.registry.certificates_of(DeviceId("a-000001")) == []
        # Factory A's own birth certificate for the same device enrolls.
        assert birth_enroll(server, tmp_path / "a" / "a-000001").status == 200
    finally:
        server.stop()
