"""The agent's trust anchors through a root rollover: a new root is adopted only through a
cross-certificate that a current anchor signed (device_agent.anchors), and the chains a device
builds and checks work with the old root alone, both roots, or the new root alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from device_agent.anchors import add_anchors, new_roots, read_anchors
from device_agent.est_wire import check_cacerts, check_issued, order_chain
from device_agent.keys import KeyType, generate_key
from enroll_server.pki.ca import Issuer, build_issuing_ca, build_root_ca
from enroll_server.pki.root_rollover import RootKeyUpdate, cross_certificate, roll_root
from fleetpki.identity import DeviceId
from tests.pki_helpers import URLS, MemoryCa, make_ca

DEV = DeviceId("dev-000001")
NOW = datetime.now(UTC)
LATER = NOW + timedelta(days=1)  # the rollover happens after the old root was made


@pytest.fixture(scope="module")
def old() -> MemoryCa:
    return make_ca(now=NOW)


@pytest.fixture(scope="module")
def update(old: MemoryCa) -> RootKeyUpdate:
    return roll_root(old.root, generate_key(KeyType.EC_P256), LATER)


def _cacerts(update: RootKeyUpdate, *extra: x509.Certificate) -> list[x509.Certificate]:
    return [*extra, *update.certificates]


def test_a_new_root_with_a_valid_cross_certificate_is_adopted(update: RootKeyUpdate) -> None:
    adopted, refused = new_roots(_cacerts(update), [update.old], LATER)
    assert refused == []
    assert [(a.root, a.cross, a.anchor) for a in adopted] == [
        (update.new, update.old_with_new, update.old)
    ]
    # Once both are anchors there is nothing new; a device that trusts only the new root does
    # not adopt the old one back through the new-signed-old certificate.
    assert new_roots(_cacerts(update), [update.old, update.new], LATER) == ([], [])
    assert new_roots(_cacerts(update), [update.new], LATER) == ([], [])


def test_a_lone_new_root_is_refused(update: RootKeyUpdate) -> None:
    adopted, refused = new_roots([update.new], [update.old], LATER)
    assert adopted == []
    assert [(r.root, r.why) for r in refused] == [
        (update.new, "no cross-certificate from a current trust anchor accompanies it")
    ]
    # Nor with only the new-signed-old certificate (the new root vouching for the old one).
    adopted, refused = new_roots([update.new, update.new_with_old], [update.old], LATER)
    assert adopted == [] and [r.root for r in refused] == [update.new]


def test_a_cross_certificate_signed_by_another_key_is_refused(
    old: MemoryCa, update: RootKeyUpdate
) -> None:
    # Same issuer name as our root, another key: the name says "old root", the signature not.
    impostor_key = generate_key(KeyType.EC_P256)
    impostor = Issuer(
        build_root_ca(impostor_key, "", NOW, subject=old.root.cert.subject), impostor_key
    )
    forged = cross_certificate(update.new, impostor, LATER)
    adopted, refused = new_roots([update.new, forged], [update.old], LATER)
    assert adopted == []
    assert [r.why for r in refused] == [
        "the cross-certificate is refused: its signature does not verify with the trust "
        "anchor's key"
    ]
    # An unrelated CA's signature, under its own name: not a current anchor.
    stranger_key = generate_key(KeyType.EC_P256)
    stranger = Issuer(build_root_ca(stranger_key, "Other Root CA", NOW), stranger_key)
    other = cross_certificate(update.new, stranger, LATER)
    adopted, refused = new_roots([update.new, other], [update.old], LATER)
    assert adopted == [] and "is not a current trust anchor" in refused[0].why


def test_an_expired_cross_certificate_is_refused(old: MemoryCa, update: RootKeyUpdate) -> None:
    after = update.old_with_new.not_valid_after_utc + timedelta(seconds=1)
    # The new root outlives the cross-certificate if the old root ends first: make one that
    # ends before the new root does, by certifying with a short-lived old root.
    short_key = generate_key(KeyType.EC_P256)
    short_root = build_root_ca(short_key, "", NOW, days=2, subject=old.root.cert.subject)
    short = Issuer(short_root, short_key)
    cross = cross_certificate(update.new, short, LATER)
    assert cross.not_valid_after_utc < update.new.not_valid_after_utc
    moment = cross.not_valid_after_utc + timedelta(seconds=1)
    adopted, refused = new_roots([update.new, cross], [short_root], moment)
    assert adopted == []
    assert "the cross-certificate is not valid now" in refused[0].why
    # And after everything has expired, nothing is adopted either.
    assert new_roots(_cacerts(update), [update.old], after)[0] == []


def test_a_cross_certificate_for_another_key_is_refused(
    old: MemoryCa, update: RootKeyUpdate
) -> None:
    # A real cross-certificate from our root, but for a different key than the offered root's
    # (same name): it vouches for that other key, not for this root.
    other_key = generate_key(KeyType.EC_P256)
    other_root = build_root_ca(other_key, "", LATER, subject=old.root.cert.subject)
    cross_for_other = cross_certificate(other_root, old.root, LATER)
    adopted, refused = new_roots([update.new, cross_for_other], [update.old], LATER)
    assert adopted == []
    assert refused[0].why == (
        "the cross-certificate is refused: it certifies another public key than the root's"
    )


def test_a_cross_certificate_that_is_not_a_ca_is_refused(
    old: MemoryCa, update: RootKeyUpdate
) -> None:
    builder = (
        x509.CertificateBuilder()
        .subject_name(update.new.subject)
        .issuer_name(old.root.cert.subject)
        .public_key(update.new.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(LATER + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    from cryptography.hazmat.primitives import hashes

    not_ca = builder.sign(old.root.key, hashes.SHA256())  # type: ignore[arg-type]
    adopted, refused = new_roots([update.new, not_ca], [update.old], LATER)
    assert adopted == [] and "not a CA certificate" in refused[0].why


def test_add_anchors_keeps_the_old_file_and_appends(tmp_path: Path, update: RootKeyUpdate) -> None:
    path = tmp_path / "ca.pem"
    from cryptography.hazmat.primitives.serialization import Encoding

    before = update.old.public_bytes(Encoding.PEM)
    path.write_bytes(before)
    add_anchors(path, [update.new])
    assert path.read_bytes().startswith(before)
    assert read_anchors(path) == [update.old, update.new]
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["ca.pem"]
    # Agents sharing one ca.pem (a simulator): a root already added is not added again.
    after = path.read_bytes()
    add_anchors(path, [update.new])
    assert path.read_bytes() == after


def test_chains_through_a_rollover_for_old_both_and_new_anchors(
    old: MemoryCa,
) -> None:
    """A device certificate from an issuing CA under the new root: a device that trusts only
    the old root ends its chain with the old-signed-new certificate and it verifies; with the
    new root as an anchor the chain stops before it."""
    # The issuing CA under the new root needs the new root's key: roll again with a known key.
    new_key = generate_key(KeyType.EC_P256)
    upd = roll_root(old.root, new_key, LATER)
    issuing_key = generate_key(KeyType.EC_P256)
    issuing = Issuer(
        build_issuing_ca(issuing_key, Issuer(upd.new, new_key), "Test Issuing CA 2", LATER),
        issuing_key,
        URLS,
    )
    ca2 = MemoryCa(Issuer(upd.new, new_key), issuing, old.server_cert, old.server_key)
    key = generate_key(KeyType.EC_P256)
    cert, _ = ca2.device_cert(DEV.value, key=key, now=LATER)  # type: ignore[arg-type]
    offered = [issuing.cert, old.issuing.cert, *upd.certificates]
    moment = LATER + timedelta(minutes=1)

    cas = check_cacerts(offered, [upd.old])
    chain = order_chain(key, [cert], cas, [upd.old])
    assert chain == [cert, issuing.cert, upd.old_with_new]
    check_issued(chain, key, DEV, [upd.old], moment)

    both = [upd.old, upd.new]
    chain = order_chain(key, [cert], check_cacerts(offered, both), both)
    assert chain == [cert, issuing.cert]
    check_issued(chain, key, DEV, both, moment)
    check_issued(chain, key, DEV, [upd.new], moment)


def test_a_root_rolled_over_at_once_is_still_newer_than_the_old(old: MemoryCa) -> None:
    """Agents take only a root newer than their anchors; roll_root makes the new root's
    notBefore later than the old one's even within the same second."""
    upd = roll_root(old.root, generate_key(KeyType.EC_P256), old.root.cert.not_valid_before_utc)
    assert upd.new.not_valid_before_utc > upd.old.not_valid_before_utc
    moment = datetime.now(UTC)
    adopted, refused = new_roots(list(upd.certificates), [upd.old], moment)
    assert [a.root for a in adopted] == [upd.new] and refused == []
    assert new_roots(list(upd.certificates), [upd.new], moment) == ([], [])
