"""agent.toml loading: the factory bundle as written, and each bad key named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.config import load_config, parse_config
from device_agent.errors import ConfigError
from device_agent.keys import KeyType

BUNDLE = """\
[device]
id = "dev-000001"
key_type = "ec-p256"          # ec-p256 | ec-p384 | rsa-2048 | ed25519
[enroll]
server = "https://localhost:8443"   # EST base; paths under /.well-known/est/
token_file = "token"                # relative paths are relative to agent.toml's folder
trust_anchor = "ca.pem"
[mqtt]
host = "localhost"
port = 8883
telemetry_interval = 30.0           # seconds
[state]
dir = "state"
"""


def test_factory_bundle_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bundle" / "agent.toml"
    path.parent.mkdir()
    path.write_text(BUNDLE)
    cfg = load_config(path)
    assert str(cfg.device_id) == "dev-000001"
    assert cfg.key_type is KeyType.EC_P256
    assert (cfg.server.host, cfg.server.port) == ("localhost", 8443)
    assert cfg.server.path("simpleenroll") == "/.well-known/est/simpleenroll"
    assert cfg.token_file == path.parent / "token"
    assert cfg.trust_anchor == path.parent / "ca.pem"
    assert cfg.state_dir == path.parent / "state"
    assert (cfg.mqtt_host, cfg.mqtt_port, cfg.telemetry_interval) == ("localhost", 8883, 30.0)


def test_defaults_and_absolute_paths_and_base_path(tmp_path: Path) -> None:
    text = (
        '[device]\nid = "pi-7"\n[enroll]\nserver = "https://est.example:9443/fleet/"\n'
        'trust_anchor = "/etc/fleetpki/ca.pem"\n[mqtt]\nhost = "broker"\ntelemetry_interval = 5\n'
    )
    cfg = parse_config(text, tmp_path / "agent.toml")
    assert cfg.key_type is KeyType.EC_P256
    assert cfg.trust_anchor == Path("/etc/fleetpki/ca.pem")
    assert cfg.token_file == tmp_path / "token"
    assert cfg.mqtt_port == 8883
    assert cfg.telemetry_interval == 5.0
    assert cfg.server.path("cacerts") == "/fleet/.well-known/est/cacerts"


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ('id = "dev-000001"\n', "", "device.id", "missing"),
        ('id = "dev-000001"', 'id = "dev/1"', "device.id", "'/'"),
        ('key_type = "ec-p256"', 'key_type = "dsa"', "device.key_type", "'dsa'"),
        ("https://localhost:8443", "http://localhost:8443", "enroll.server", "https"),
        ("https://localhost:8443", "https://:8443", "enroll.server", "host"),
        ("port = 8883", "port = 70000", "mqtt.port", "70000"),
        ("port = 8883", 'port = "8883"', "mqtt.port", "int"),
        (
            "telemetry_interval = 30.0",
            "telemetry_interval = -1.0",
            "mqtt.telemetry_interval",
            "> 0",
        ),
        ('host = "localhost"', 'host = ""', "mqtt.host", "empty"),
        ("[mqtt]", "[mqtt_typo]", "mqtt", "missing"),
    ],
)
def test_bad_values_name_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, words: str
) -> None:
    assert old in BUNDLE
    path = tmp_path / "agent.toml"
    path.write_text(BUNDLE.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert info.value.path == path
    assert str(path) in str(info.value) and key in str(info.value)
    assert words in str(info.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    path = tmp_path / "agent.toml"
    path.write_text("[device\nid=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_unknown_keys_are_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BUNDLE + "[extra]\nx = 1\n")
    cfg = load_config(path)
    assert str(cfg.device_id) == "dev-000001"
    assert "unknown section [extra]" in caplog.text
