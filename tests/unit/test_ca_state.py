"""The CA state a home records for the other nodes (home/ca_state.py): never a clear key,
never a file outside H/ca/, and the same files back after a round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from enroll_server.home.ca_state import CaState, read_state
from enroll_server.home.layout import HomeError, home_passphrase
from enroll_server.pki.keys import load_private_key_pem
from tests.live_server import make_home


def test_a_home_state_round_trips_and_carries_keys_only_encrypted(tmp_path: Path) -> None:
    layout = make_home(tmp_path / "home")
    state = read_state(layout)
    assert CaState.decode(state.encode()) == state
    assert state.files["issuing.pem"] == layout.issuing_cert.read_bytes()
    assert state.files["issuing.key"] == layout.issuing_key.read_bytes()
    assert "passphrase" not in state.files and "chain.pem" not in state.files
    phrase = home_passphrase(layout)
    assert phrase not in state.encode().encode()
    key = load_private_key_pem(layout.issuing_key.read_bytes(), phrase)
    clear = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    layout.issuing_key.write_bytes(clear)
    with pytest.raises(HomeError, match=r"ca/issuing.key is not encrypted"):
        read_state(layout)


@pytest.mark.parametrize("name", ["../fleetpki.toml", "/etc/passwd", "issuers/../../x"])
def test_a_state_naming_a_file_outside_the_ca_folder_is_refused(name: str) -> None:
    text = CaState({name: b"x"}).encode()
    with pytest.raises(ValueError, match="outside H/ca/"):
        CaState.decode(text)
