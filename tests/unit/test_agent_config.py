"""agent.toml loading: the factory bundle as written, and each bad key named in the error."""

from __future__ import annotations

import logging
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
    assert cfg.server.device_status_path == "/fleet/device/status"  # not an EST operation
    assert cfg.suspended_retry_max == 600.0


def test_suspended_retry_max_sets_the_agent_backoff_cap(tmp_path: Path) -> None:
    from device_agent.agent import Agent

    text = BUNDLE.replace("[enroll]\n", "[enroll]\nsuspended_retry_max = 120\n")
    cfg = parse_config(text, tmp_path / "agent.toml")
    assert cfg.suspended_retry_max == 120.0
    backoff = Agent(cfg).suspended_backoff
    assert (backoff.base, backoff.cap) == (30.0, 120.0)
    short = Agent(parse_config(text.replace("= 120", "= 5"), tmp_path / "agent.toml"))
    assert (short.suspended_backoff.base, short.suspended_backoff.cap) == (5.0, 5.0)


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
        (
            'trust_anchor = "ca.pem"',
            'trust_anchor = "ca.pem"\nsuspended_retry_max = 0',
            "enroll.suspended_retry_max",
            "1..86400",
        ),
        ("[mqtt]", "[mqtt_typo]", "mqtt", "missing"),
        # bench/fuzz/fuzz_agent_bundle.py: urlsplit's ValueError ("Invalid IPv6 URL") escaped.
        (
            'server = "https://localhost:8443"',
            'server = "https://localc[lhos443"',
            "enroll.server",
            "is not a URL",
        ),
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
    # Explicit: another test in the session (the simulator CLI) may have quietened the logger.
    caplog.set_level(logging.WARNING, logger="fleetpki.agent")
    path = tmp_path / "agent.toml"
    path.write_text(BUNDLE + "[extra]\nx = 1\n")
    cfg = load_config(path)
    assert str(cfg.device_id) == "dev-000001"
    assert "unknown section [extra]" in caplog.text


# ------------------------------------------------------------------ IDevID (birth certificate)

IDEVID_BUNDLE = BUNDLE.replace(
    'token_file = "token"                # relative paths are relative to agent.toml\'s folder',
    'idevid_cert = "idevid.pem"\nidevid_key = "idevid.key"',
)


@pytest.fixture(scope="module")
def birth_pairs() -> dict[str, tuple[bytes, bytes]]:
    """Real birth certificates of two devices from a manufacturer CA, as `batch create
    --idevid` makes them: {device id: (certificate PEM, key PEM)}."""
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives.serialization import Encoding

    from enroll_server.pki.keys import KeyType as ServerKeyType
    from enroll_server.pki.keys import generate_key as server_generate_key
    from enroll_server.pki.keys import private_key_pem
    from fleetpki.identity import DeviceId
    from provisioning.idevid import build_birth_certificate
    from provisioning.manufacturer import ManufacturerCa, build_manufacturer_ca

    now = datetime.now(UTC)
    ca_key = server_generate_key(ServerKeyType.EC_P256)
    ca = ManufacturerCa("acme", build_manufacturer_ca(ca_key, "acme", now), ca_key)
    pairs = {}
    for name in ("dev-000001", "dev-000002"):
        key = server_generate_key(ServerKeyType.EC_P256)
        cert = build_birth_certificate(key.public_key(), DeviceId(name), "lot-1", ca, now)
        pairs[name] = (cert.public_bytes(Encoding.PEM), private_key_pem(key, None))
    return pairs


def idevid_bundle(folder: Path, pairs: dict[str, tuple[bytes, bytes]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = pairs["dev-000001"]
    (folder / "idevid.pem").write_bytes(cert)
    (folder / "idevid.key").write_bytes(key)
    (folder / "agent.toml").write_text(IDEVID_BUNDLE)
    return folder / "agent.toml"


def test_idevid_bundle_loads_with_birth_credentials(
    tmp_path: Path, birth_pairs: dict[str, tuple[bytes, bytes]]
) -> None:
    path = idevid_bundle(tmp_path / "b", birth_pairs)
    cfg = load_config(path)
    assert cfg.idevid is not None
    assert cfg.idevid.cert == path.parent / "idevid.pem"
    assert cfg.idevid.key == path.parent / "idevid.key"
    # A token bundle has none.
    plain = tmp_path / "t" / "agent.toml"
    plain.parent.mkdir()
    plain.write_text(BUNDLE)
    assert load_config(plain).idevid is None


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ('idevid_key = "idevid.key"', "", "enroll.idevid_key", "needs its pair"),
        ('idevid_cert = "idevid.pem"', "", "enroll.idevid_cert", "needs its pair"),
        (
            'idevid_key = "idevid.key"',
            'idevid_key = "idevid.key"\ntoken_file = "token"',
            "enroll.token_file",
            "not both",
        ),
        ('idevid_key = "idevid.key"', "idevid_key = 7", "enroll.idevid_key", "str"),
        ('idevid_cert = "idevid.pem"', 'idevid_cert = ""', "enroll.idevid_cert", "empty"),
    ],
)
def test_idevid_keys_are_checked(tmp_path: Path, old: str, new: str, key: str, words: str) -> None:
    assert old in IDEVID_BUNDLE
    path = tmp_path / "agent.toml"
    with pytest.raises(ConfigError) as info:
        parse_config(IDEVID_BUNDLE.replace(old, new, 1), path)
    assert info.value.key == key and info.value.path == path
    assert words in str(info.value) and key in str(info.value)


def _unreadable_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()  # reading a folder fails for root too


@pytest.mark.parametrize(
    ("damage", "key", "words"),
    [
        (lambda b, _o: (b / "idevid.key").unlink(), "enroll.idevid_key", "cannot read"),
        (lambda b, _o: (b / "idevid.pem").unlink(), "enroll.idevid_cert", "cannot read"),
        (lambda b, _o: _unreadable_dir(b / "idevid.key"), "enroll.idevid_key", "cannot read"),
        (
            lambda b, o: (b / "idevid.key").write_bytes(o["dev-000002"][1]),
            "enroll.idevid_key",
            "does not match the birth certificate",
        ),
        (
            lambda b, _o: (b / "idevid.pem").write_text("hello"),
            "enroll.idevid_cert",
            "not a PEM birth certificate",
        ),
        (
            lambda b, _o: (b / "idevid.pem").write_text(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            ),
            "enroll.idevid_cert",
            "not a valid certificate",
        ),
        (
            lambda b, _o: (b / "idevid.key").write_text(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            ),
            "enroll.idevid_key",
            "not a usable unencrypted private key",
        ),
    ],
    ids=[
        "key-missing",
        "cert-missing",
        "key-is-a-folder",
        "other-key",
        "cert-not-pem",
        "cert-corrupt",
        "key-corrupt",
    ],
)
def test_idevid_files_are_checked_and_named(
    tmp_path: Path,
    birth_pairs: dict[str, tuple[bytes, bytes]],
    damage,  # type: ignore[no-untyped-def]
    key: str,
    words: str,
) -> None:
    path = idevid_bundle(tmp_path / "b", birth_pairs)
    damage(path.parent, birth_pairs)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and info.value.path == path
    named = path.parent / ("idevid.key" if key.endswith("_key") else "idevid.pem")
    assert str(named) in str(info.value), str(info.value)
    assert words in str(info.value), str(info.value)


def test_birth_certificate_of_another_device_is_a_config_error(
    tmp_path: Path, birth_pairs: dict[str, tuple[bytes, bytes]]
) -> None:
    from device_agent.idevid import check_birth_subject

    path = idevid_bundle(tmp_path / "b", birth_pairs)
    cfg = load_config(path)
    assert cfg.idevid is not None
    check_birth_subject(cfg.idevid, cfg.device_id, path)  # its own: fine
    cert, key = birth_pairs["dev-000002"]
    (path.parent / "idevid.pem").write_bytes(cert)
    (path.parent / "idevid.key").write_bytes(key)
    cfg = load_config(path)  # a matching pair, but of another device
    assert cfg.idevid is not None
    with pytest.raises(ConfigError) as info:
        check_birth_subject(cfg.idevid, cfg.device_id, path)
    assert info.value.key == "enroll.idevid_cert"
    assert "dev-000002" in str(info.value) and "'dev-000001'" in str(info.value)
