"""load_root_issuer: the root CA from the home (online root) or from an offline folder."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_server.home.config import ServerConfig
from enroll_server.home.layout import (
    ROOT_CRL_LIFETIME,
    HomeError,
    HomeLayout,
    home_passphrase,
    init_home,
)
from enroll_server.home.root import (
    OfflineRoot,
    RootCrlEntry,
    load_root_issuer,
    publish_root_crl,
    root_crl,
    sign_offline_root_crl,
)
from enroll_server.pki.keys import load_private_key_pem, private_key_pem
from fleetpki.atomic_file import write_atomic

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
PHRASE = "offline-root-phrase-17"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("FLEETPKI_CA_PASSPHRASE", raising=False)
    monkeypatch.delenv("FLEETPKI_ROOT_PASSPHRASE", raising=False)
    init_home(tmp_path / "home", ServerConfig(), NOW)
    return tmp_path / "home"


def _move_root_offline(home: Path, folder: Path) -> None:
    """What an offline root looks like: DIR/root.{pem,key}, the key under its own phrase."""
    layout = HomeLayout(home)
    key = load_private_key_pem(layout.root_key.read_bytes(), home_passphrase(layout))
    folder.mkdir()
    write_atomic(OfflineRoot(folder).key, private_key_pem(key, PHRASE.encode()))
    shutil.copy(layout.root_cert, OfflineRoot(folder).cert)
    layout.root_key.unlink()


def test_online_root_comes_from_the_home(home: Path) -> None:
    layout = HomeLayout(home)
    root = load_root_issuer(layout, None)
    assert root.cert.public_bytes(serialization.Encoding.PEM) == layout.root_cert.read_bytes()
    assert root.key.public_key() == root.cert.public_key()


def test_offline_root_comes_from_its_folder_with_its_own_passphrase(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = HomeLayout(home)
    folder = tmp_path / "usb"
    _move_root_offline(home, folder)
    with pytest.raises(HomeError, match=r"no root key in the home .*--root DIR"):
        load_root_issuer(layout, None)
    with pytest.raises(HomeError, match="FLEETPKI_ROOT_PASSPHRASE"):
        load_root_issuer(layout, folder)
    phrase_file = tmp_path / "phrase"
    phrase_file.write_text("wrong passphrase here\n")
    with pytest.raises(HomeError, match="wrong passphrase"):
        load_root_issuer(layout, folder, phrase_file)
    phrase_file.write_text(PHRASE + "\n")
    root = load_root_issuer(layout, folder, phrase_file)
    assert root.cert.public_key() == load_root_issuer(None, folder, phrase_file).cert.public_key()
    monkeypatch.setenv("FLEETPKI_ROOT_PASSPHRASE", PHRASE)
    assert load_root_issuer(layout, folder).key.public_key() == root.cert.public_key()


def test_offline_folder_errors_name_what_is_missing_or_foreign(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETPKI_ROOT_PASSPHRASE", PHRASE)
    layout = HomeLayout(home)
    with pytest.raises(HomeError, match="not found"):
        load_root_issuer(layout, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HomeError, match=r"root\.pem and .*root\.key missing"):
        load_root_issuer(layout, empty)
    # Another home's root: refused against this home, accepted with no home (a ceremony).
    monkeypatch.delenv("FLEETPKI_ROOT_PASSPHRASE")
    init_home(tmp_path / "other", ServerConfig(), NOW)
    _move_root_offline(tmp_path / "other", tmp_path / "other-usb")
    monkeypatch.setenv("FLEETPKI_ROOT_PASSPHRASE", PHRASE)
    with pytest.raises(HomeError, match="not the home's root"):
        load_root_issuer(layout, tmp_path / "other-usb")
    assert load_root_issuer(None, tmp_path / "other-usb").cert.subject is not None


def test_a_root_revocation_is_carried_into_every_later_root_crl(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = HomeLayout(home)
    root = load_root_issuer(layout, None)
    gone = RootCrlEntry(0x1234, NOW, "cACompromise")
    first = publish_root_crl(layout, root, NOW, ROOT_CRL_LIFETIME, revoke=[gone])
    assert [r.serial_number for r in first] == [0x1234]
    # serve's re-sign at half life keeps it, with its date and reason.
    later = root_crl(layout, NOW + ROOT_CRL_LIFETIME * 0.6)
    assert later is not None and later.last_update_utc > first.last_update_utc
    (entry,) = list(later)
    assert entry.serial_number == 0x1234 and entry.revocation_date_utc == NOW
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.ca_compromise
    # So does an offline ceremony, numbered after the home's copy.
    _move_root_offline(home, tmp_path / "usb")
    monkeypatch.setenv("FLEETPKI_ROOT_PASSPHRASE", PHRASE)
    offline = load_root_issuer(layout, tmp_path / "usb")
    day_after = NOW + timedelta(days=1)
    ceremony = sign_offline_root_crl(tmp_path / "usb", offline, day_after, 365, layout)
    number = ceremony.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert [r.serial_number for r in ceremony] == [0x1234] and number == 4


def test_an_offline_root_is_accepted_while_root_pem_holds_two_roots(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # During a root rollover H/ca/root.pem holds the new root and the old one.
    layout = HomeLayout(home)
    _move_root_offline(home, tmp_path / "usb")
    init_home(tmp_path / "next", ServerConfig(), NOW)
    newer = HomeLayout(tmp_path / "next").root_cert.read_bytes()
    layout.root_cert.write_bytes(newer + layout.root_cert.read_bytes())
    monkeypatch.setenv("FLEETPKI_ROOT_PASSPHRASE", PHRASE)
    root = load_root_issuer(layout, tmp_path / "usb")
    assert root.cert.public_bytes(serialization.Encoding.PEM) in layout.root_cert.read_bytes()


def test_fleetpki_toml_names_a_root_key_in_a_token_only_for_a_root_of_the_home(
    tmp_path: Path,
) -> None:
    from enroll_server.home.config import ConfigError, load_config, render_config, with_root_key

    uri = "pkcs11:token=fleet;object=root;type=private"
    path = tmp_path / "fleetpki.toml"
    path.write_text(render_config(ServerConfig(root_key=uri)))
    assert load_config(path).root_key == uri
    path.write_text(with_root_key(path.read_text(), uri.replace("root;", "root2;")))
    assert load_config(path).root_key == uri.replace("root;", "root2;")
    offline = render_config(ServerConfig(root="offline")).replace(
        "[ca]\n", f'[ca]\nroot_key = "{uri}"\n'
    )
    path.write_text(offline)
    with pytest.raises(ConfigError, match=r"\[ca.root_key\] a root key in a token"):
        load_config(path)
    path.write_text(render_config(ServerConfig(root_key="pkcs11:object=root")))
    with pytest.raises(ConfigError, match=r"\[ca.root_key\] a token label is required"):
        load_config(path)
    with pytest.raises(ValueError, match="no root_key line"):
        with_root_key(render_config(ServerConfig()), uri)
