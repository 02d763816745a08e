"""`fleetpki ca rollover-root`: a new root under the old one's name, cross-certified both ways
(RFC 4210 4.4), published in /cacerts, trusted by relying parties (chain.pem) next to the old
one, and sent in server.pem so devices that trust either root verify the server; refusals
leave the home as it was. Real agents through the rollover: tests/integration/
test_root_rollover_agents.py."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from enroll_server.est.wire import decode_certs_only
from enroll_server.home.layout import HomeLayout, load_home
from enroll_server.home.root import OfflineRoot, load_root_issuer
from enroll_server.pki.keys import KeyType, generate_key
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from fleetpki.identity import DeviceId
from tests.ca_ceremony import (
    EST,
    fleetpki,
    home_snapshot,
    openssl_verify,
    serving,
    write_pem,
)
from tests.est_client import request
from tests.live_server import make_home

PHRASE = "offline root passphrase 17"


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _cacerts(est_url: str, anchor: Path) -> list[x509.Certificate]:
    """/cacerts over TLS verified with `anchor` only, as a device does."""
    ctx = ssl.create_default_context(cafile=str(anchor))
    return decode_certs_only(request(est_url + EST + "/cacerts", ctx).body)


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:
        return False
    return True


def test_rollover_root_installs_the_new_root_and_both_cross_certificates(tmp_path: Path) -> None:
    layout = make_home(tmp_path / "home")
    old_root = _certs(layout.root_cert)[0]
    loaded = load_home(layout.root)
    # A device certificate from before: relying parties must keep accepting it.
    device_key = generate_key(KeyType.EC_P256)
    device = build_device_certificate(
        device_key.public_key(), DeviceId("dev-old"), loaded.issuer, datetime.now(UTC),
        DeviceProfile(),
    )  # fmt: skip
    server_leaf = _certs(layout.server_cert)[0]

    done = fleetpki("ca", "rollover-root", "--home", str(layout.root))
    assert done.returncode == 0, done.stdout + done.stderr

    (new_root,) = _certs(layout.root_cert)
    assert new_root.subject == old_root.subject  # the old root's name: self-issued crosses
    assert new_root.public_key() != old_root.public_key() and _self_signed(new_root)
    old_with_new, new_with_old, oldest = _certs(layout.root_update)
    assert oldest == old_root
    assert old_with_new.public_key() == new_root.public_key()
    old_with_new.verify_directly_issued_by(old_root)
    assert new_with_old.public_key() == old_root.public_key()
    new_with_old.verify_directly_issued_by(new_root)
    for cross in (old_with_new, new_with_old):
        assert cross.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The new root's key is in the home under the home's passphrase; it signs the root CRL.
    assert load_root_issuer(layout, None).cert == new_root
    root_crl = x509.load_der_x509_crl(layout.root_crl.read_bytes())
    assert root_crl.is_signature_valid(new_root.public_key())  # type: ignore[arg-type]
    # Relying parties (chain.pem) trust both roots: the old device certificate verifies.
    chain = _certs(layout.chain)
    assert old_root in chain and new_root in chain
    device_pem = write_pem(tmp_path / "device.pem", [device])
    ok = openssl_verify(layout.chain, device_pem)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # server.pem: the same certificate, now followed by the new-signed-old certificate, so a
    # client that trusts only the new root verifies it, as does one that trusts the old.
    sent = _certs(layout.server_cert)
    assert sent[0] == server_leaf and sent[-1] == new_with_old
    leaf_pem = write_pem(tmp_path / "leaf.pem", sent[:1])
    rest = write_pem(tmp_path / "rest.pem", sent[1:])
    for anchor in (old_root, new_root):
        verified = openssl_verify(write_pem(tmp_path / "anchor.pem", [anchor]), leaf_pem, rest)
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_serve_publishes_the_rollover_in_cacerts_at_once(tmp_path: Path) -> None:
    """A running serve answers /cacerts with the new root, both cross-certificates and the
    old root from the next request on; a client that trusts either root verifies the server."""
    layout = make_home(tmp_path / "home")
    old_root = _certs(layout.root_cert)[0]
    old_pem = write_pem(tmp_path / "old.pem", [old_root])
    with serving(layout.root) as server:
        before = _cacerts(server.est_url, old_pem)
        assert set(before) == {load_home(layout.root).issuer.cert, old_root}
        done = fleetpki("ca", "rollover-root", "--home", str(layout.root))
        assert done.returncode == 0, done.stdout + done.stderr
        new_root = _certs(layout.root_cert)[0]
        update = _certs(layout.root_update)
        after = _cacerts(server.est_url, old_pem)
        assert set(after) == {*before, new_root, *update}


def test_rollover_root_refusals_leave_the_home_as_it_was(tmp_path: Path) -> None:
    layout = make_home(tmp_path / "home")
    snapshot = home_snapshot(layout.root)
    # --new-root is for an offline root.
    done = fleetpki("ca", "rollover-root", "--home", str(layout.root), "--new-root",
                    str(tmp_path / "usb2"))  # fmt: skip
    assert done.returncode != 0
    assert "--new-root is for an offline root" in done.stdout + done.stderr
    assert not (tmp_path / "usb2").exists()
    assert home_snapshot(layout.root) == snapshot
    # The operator's own root: rolled over in their PKI, not here.
    config = layout.config.read_text()
    external = '[ca]\nroot = "external"\n'
    config = config.replace("[ca]\n", external, 1) if "[ca]\n" in config else config + external
    layout.config.write_text(config)
    snapshot = home_snapshot(layout.root)
    done = fleetpki("ca", "rollover-root", "--home", str(layout.root))
    assert done.returncode != 0
    assert "roll it over there" in done.stdout + done.stderr
    assert home_snapshot(layout.root) == snapshot


@pytest.fixture
def offline(tmp_path: Path) -> tuple[Path, Path, Path]:
    home, usb, phrase_file = tmp_path / "home", tmp_path / "usb", tmp_path / "root-phrase"
    phrase_file.write_text(PHRASE + "\n")
    done = fleetpki("init", "--home", str(home), "--root-offline", str(usb),
                    "--root-passphrase-file", str(phrase_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return home, usb, phrase_file


def test_offline_root_rollover_puts_the_new_key_in_a_new_folder(
    offline: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    home, usb, phrase_file = offline
    layout = HomeLayout(home)
    old_root = _certs(layout.root_cert)[0]
    snapshot = home_snapshot(home)
    # Without --new-root: refused, nothing written.
    done = fleetpki("ca", "rollover-root", "--home", str(home), "--root", str(usb),
                    "--root-passphrase-file", str(phrase_file))  # fmt: skip
    assert done.returncode != 0 and "--new-root DIR2" in done.stdout + done.stderr
    assert home_snapshot(home) == snapshot
    usb2 = tmp_path / "usb2"
    done = fleetpki("ca", "rollover-root", "--home", str(home), "--root", str(usb),
                    "--new-root", str(usb2),
                    "--root-passphrase-file", str(phrase_file))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert PHRASE not in done.stdout + done.stderr
    assert not layout.root_key.exists()  # still offline
    new_root = _certs(layout.root_cert)[0]
    assert new_root.public_key() != old_root.public_key()
    assert OfflineRoot(usb2).cert.read_bytes() == layout.root_cert.read_bytes()
    assert OfflineRoot(usb2).key.stat().st_mode & 0o777 == 0o600
    # The next ceremonies take the new folder; the old one is no longer the home's root.
    assert load_root_issuer(layout, usb2, phrase_file).cert == new_root
    root_crl = x509.load_der_x509_crl(layout.root_crl.read_bytes())
    assert root_crl.is_signature_valid(new_root.public_key())  # type: ignore[arg-type]
    assert _certs(layout.root_update)[2] == old_root
