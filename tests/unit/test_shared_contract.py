"""The shared contract: device ids, topics and ACL rules, durations, atomic files."""

from __future__ import annotations

import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from fleetpki.atomic_file import write_atomic
from fleetpki.duration import InvalidDuration, format_duration, parse_duration
from fleetpki.identity import DeviceId, InvalidIdentifier
from fleetpki.topics import InvalidTopic, Role, Topic, may_publish, may_subscribe


@pytest.mark.parametrize("good", ["dev-1", "A", "pi_0001", "x" * 64, "0abc"])
def test_valid_ids(good: str) -> None:
    assert DeviceId(good).value == good
    assert DeviceId(good).urn == f"urn:fleetpki:device:{good}"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("", "empty"),
        ("x" * 65, "65 characters"),
        ("a b", "' '"),
        ("a/b", "'/'"),
        ("../etc", "'.'"),
        ("..", "'.'"),
        ("a+b", "'+'"),
        ("a#", "'#'"),
        ("-lead", "must start"),
        ("tab\there", "'\\t'"),
        ("nul\x00", "'\\x00'"),
        ("ünï", "'ü'"),
        # '$' matches before a trailing newline: the grammar must hold to the last character.
        ("dev-1\n", "'\\n'"),
        ("dev-1\r\n", "'\\r'"),
    ],
)
def test_invalid_ids_name_the_problem(bad: str, why: str) -> None:
    with pytest.raises(InvalidIdentifier) as info:
        DeviceId(bad)
    assert why in str(info.value) and repr(bad) in str(info.value)


def test_device_acl() -> None:
    assert may_publish(Role.DEVICE, "d1", "devices/d1/telemetry")
    assert may_subscribe(Role.DEVICE, "d1", "devices/d1/commands")
    assert may_subscribe(Role.DEVICE, "d1", "devices/d1/#")
    assert may_subscribe(Role.DEVICE, "d1", "devices/d1/+")
    assert not may_publish(Role.DEVICE, "d1", "devices/d2/telemetry")
    assert not may_publish(Role.DEVICE, "d1", "devices/d1/+")  # wildcard in a topic name
    for f in (
        "#",
        "devices/#",
        "devices/+/#",
        "devices/+/telemetry",
        "+/d1/#",
        "$SYS/#",
        "devices/d10/#",
    ):
        assert not may_subscribe(Role.DEVICE, "d1", f), f


def test_service_acl() -> None:
    assert may_subscribe(Role.SERVICE, "backend", "devices/+/telemetry")
    assert may_subscribe(Role.SERVICE, "backend", "devices/d1/telemetry")
    assert may_publish(Role.SERVICE, "backend", "devices/d1/commands")
    assert not may_publish(Role.SERVICE, "backend", "devices/d1/telemetry")
    assert not may_subscribe(Role.SERVICE, "backend", "devices/#")
    assert not may_subscribe(Role.SERVICE, "backend", "#")


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", ""])
def test_bad_filters(bad: str) -> None:
    with pytest.raises(InvalidTopic):
        Topic(bad, is_filter=True)


def test_sha256_hex_refuses_a_trailing_newline() -> None:
    from enroll_server.registry import InvalidValue
    from enroll_server.registry.models import check_sha256_hex

    assert check_sha256_hex("h", "a" * 64) == "a" * 64
    with pytest.raises(InvalidValue, match="SHA-256"):
        check_sha256_hex("h", "a" * 64 + "\n")


def test_durations() -> None:
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    assert format_duration(timedelta(days=14)) == "2w"
    assert format_duration(timedelta(seconds=90)) == "90s"
    for bad in ("", "7", "d", "-1d", "0s", "3y"):
        with pytest.raises(InvalidDuration, match="invalid duration"):
            parse_duration(bad)


def test_write_atomic_is_0600_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    write_atomic(target, b"one")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temp file left behind


def test_write_atomic_failure_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state"
    write_atomic(target, b"old")

    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
