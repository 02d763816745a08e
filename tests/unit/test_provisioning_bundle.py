"""Bundles: agent.toml is what the device agent accepts; files 0600, folders 0700; tar form."""

from __future__ import annotations

import os
import stat
import tarfile
import tomllib
from pathlib import Path

import pytest

from device_agent.config import parse_config
from enroll_server.home.config import ServerConfig
from fleetpki.identity import DeviceId
from provisioning.bundle import BundleSettings, BundleWriter, render_agent_toml

DEV = DeviceId("dev-000042")


def test_agent_toml_is_accepted_by_the_agent(tmp_path: Path) -> None:
    cfg = ServerConfig(public_host="factory.example", est_port=9443, mqtt_port=9883)
    text = render_agent_toml(DEV, BundleSettings.from_config(cfg), idevid=False)
    agent = parse_config(text, tmp_path / "bundle" / "agent.toml")
    assert agent.device_id == DEV
    assert agent.server.url == "https://factory.example:9443"
    assert agent.token_file == tmp_path / "bundle" / "token"
    assert agent.trust_anchor == tmp_path / "bundle" / "ca.pem"
    assert (agent.mqtt_host, agent.mqtt_port) == ("factory.example", 9883)
    assert agent.state_dir == tmp_path / "bundle" / "state"
    assert agent.key_type.value == "ec-p256"


def test_ipv6_host_and_quotes_are_escaped() -> None:
    cfg = ServerConfig(public_host="::1")
    doc = tomllib.loads(render_agent_toml(DEV, BundleSettings.from_config(cfg), idevid=False))
    assert doc["enroll"]["server"] == "https://[::1]:8443"
    odd = BundleSettings('https://h"x\\:1', "h", 1)
    assert tomllib.loads(render_agent_toml(DEV, odd, idevid=False))["enroll"]["server"] == (
        'https://h"x\\:1'
    )


def test_idevid_agent_toml_names_birth_credentials_not_a_token() -> None:
    doc = tomllib.loads(
        render_agent_toml(DEV, BundleSettings.from_config(ServerConfig()), idevid=True)
    )
    assert doc["enroll"]["idevid_cert"] == "idevid.pem"
    assert doc["enroll"]["idevid_key"] == "idevid.key"
    assert "token_file" not in doc["enroll"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277])
def test_folder_and_files_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        writer = BundleWriter(tmp_path)
        rel = writer.write(DEV, {"agent.toml": b"a", "ca.pem": b"c", "token": b"secret"})
    finally:
        os.umask(old)
    folder = tmp_path / rel
    assert rel == DEV.value
    assert mode(folder) == 0o700
    assert {p.name: mode(p) for p in folder.iterdir()} == {
        "agent.toml": 0o600,
        "ca.pem": 0o600,
        "token": 0o600,
    }
    assert (folder / "token").read_bytes() == b"secret"


def test_existing_bundle_is_never_overwritten(tmp_path: Path) -> None:
    writer = BundleWriter(tmp_path)
    writer.write(DEV, {"token": b"one"})
    with pytest.raises(FileExistsError):
        writer.write(DEV, {"token": b"two"})
    assert (tmp_path / DEV.value / "token").read_bytes() == b"one"


def test_tar_bundle(tmp_path: Path) -> None:
    writer = BundleWriter(tmp_path, tar=True, mtime=1_700_000_000)
    rel = writer.write(DEV, {"agent.toml": b"toml", "token": b"tok"})
    assert rel == "dev-000042.tar"
    assert mode(tmp_path / rel) == 0o600
    with tarfile.open(tmp_path / rel) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"dev-000042", "dev-000042/agent.toml", "dev-000042/token"}
        assert members["dev-000042"].isdir() and members["dev-000042"].mode == 0o700
        assert members["dev-000042/token"].mode == 0o600
        assert members["dev-000042/token"].mtime == 1_700_000_000
        extracted = tar.extractfile("dev-000042/token")
        assert extracted is not None and extracted.read() == b"tok"
