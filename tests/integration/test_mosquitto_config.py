"""mosquitto-config against a real mosquitto: service ACL, TLS policy, packet size, reruns."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enroll_server.broker.mosquitto_cli import app
from enroll_server.broker.mosquitto_config import MosquittoFiles
from enroll_server.broker.mosquitto_dynsec import open_control
from enroll_server.broker.mosquitto_sync import MosquittoSync, read_cursor, read_pid, service_names
from enroll_server.enrollment.identities import issue_service_identity
from enroll_server.registry import Registry
from enroll_server.revocation.publisher import CrlPublisher
from fleetpki.identity import DeviceId
from tests.integration.test_revocation_mosquitto import Broker, Device, _start, runner
from tests.live_server import make_home


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    yield from _start(tmp_path)


def _sync_with_services(broker: Broker) -> MosquittoSync:
    registry = broker.fleet.registry
    return MosquittoSync(
        CrlPublisher(registry, broker.loaded.issuer, since_seq=read_cursor(broker.files)),
        broker.files,
        lambda: read_pid(broker.files.pidfile),
        open_control(broker.files),
        lambda: datetime.now(UTC),
        services=lambda: service_names(registry),
        acl_interval=0.0,
    )


def test_a_service_reads_telemetry_and_commands_devices_through_mosquitto(
    broker: Broker,
) -> None:
    fleet = broker.fleet
    fleet.enroll("mq-sv-dev1")
    fleet.enroll("mq-sv-dev2")
    identity = issue_service_identity(broker.home, "backend", None, datetime.now(UTC))
    sync = _sync_with_services(broker)
    reloads = broker.log().count("Reloading config.")
    sync.step()  # the ACL now names the service: rewritten and reloaded
    broker.wait_reloads(reloads + 1)
    acl = broker.files.acl.read_text().splitlines()
    assert "user backend" in acl and "topic read devices/+/telemetry" in acl
    service = Device(broker, "backend", (identity.cert, identity.key)).start()
    dev1 = Device(broker, "mq-sv-dev1").start()
    dev2 = Device(broker, "mq-sv-dev2").start()
    try:
        service.subscribe("devices/+/telemetry")
        dev1.subscribe("devices/mq-sv-dev1/commands")
        dev2.subscribe("devices/mq-sv-dev1/#")  # another device's topics: never delivered
        dev1.client.publish("devices/mq-sv-dev1/telemetry", b"t=21", qos=1).wait_for_publish(5)
        assert service.wait_message("devices/mq-sv-dev1/telemetry") == b"t=21"
        service.client.publish("devices/mq-sv-dev1/commands", b"reboot", qos=1).wait_for_publish(5)
        assert dev1.wait_message("devices/mq-sv-dev1/commands") == b"reboot"
        # The service may not write telemetry; a device may not read another's topics.
        service.client.publish("devices/mq-sv-dev1/telemetry", b"forged", qos=1).wait_for_publish(5)
        assert dev2.wait_message("devices/mq-sv-dev1/telemetry", timeout=0.5) is None
        assert dev2.wait_message("devices/mq-sv-dev1/commands", timeout=0.5) is None
        assert service.wait_message("devices/mq-sv-dev1/commands", timeout=0.5) is None
        # Revoking the service takes its block out of the ACL at the next round.
        fleet.registry.revoke_device(
            DeviceId("backend"), reason="cessationOfOperation", now=datetime.now(UTC), actor="t"
        )
        sync.step()
        assert "user backend" not in broker.files.acl.read_text()
    finally:
        service.stop()
        dev1.stop()
        dev2.stop()


def test_an_oversized_publish_disconnects_the_client_only(broker: Broker) -> None:
    assert "max_packet_size 262144" in broker.files.conf.read_text().splitlines()
    broker.fleet.enroll("mq-big-1")
    broker.fleet.enroll("mq-small-1")
    big = Device(broker, "mq-big-1").start()
    small = Device(broker, "mq-small-1").start()
    try:
        small.subscribe("devices/mq-small-1/#")
        big.client.publish("devices/mq-big-1/telemetry", b"x" * 300_000, qos=0)
        assert big.dropped.wait(5), "mosquitto kept a client that sent 300 kB"
        small.client.publish("devices/mq-small-1/telemetry", b"ok", qos=1).wait_for_publish(5)
        assert small.wait_message("devices/mq-small-1/telemetry") == b"ok"
    finally:
        big.stop()
        small.stop()


def _s_client(broker: Broker, *args: str) -> str:
    fleet = broker.fleet
    proc = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{broker.port}",
            "-CAfile", str(fleet.chain_file()),
            "-cert", str(fleet.cert_file("mq-tls-1")), "-key", str(fleet.key_file("mq-tls-1")),
            *args,
        ],
        input=b"",
        capture_output=True,
        timeout=15,
    )  # fmt: skip
    return (proc.stdout + proc.stderr).decode(errors="replace")


def test_tls_is_1_2_or_later_with_aead_suites_only(broker: Broker) -> None:
    conf = broker.files.conf.read_text().splitlines()
    assert "tls_version tlsv1.2" in conf
    broker.fleet.enroll("mq-tls-1")
    ok = _s_client(broker, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert "Cipher is ECDHE-ECDSA-AES128-GCM-SHA256" in ok, ok
    for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):
        out = _s_client(broker, "-tls1_2", "-cipher", cbc)
        assert f"Cipher is {cbc}" not in out and "Cipher is (NONE)" in out, out
    old = _s_client(broker, "-tls1_1", "-cipher", "ALL:@SECLEVEL=0")
    assert "Cipher is (NONE)" in old or "no protocols available" in old, old


def _run_config(home: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(
        app,
        ["mosquitto-config", "--home", str(home), "--out", str(out), "--no-live-drop", *extra],
    )
    return result.exit_code, result.output


def test_rerun_refuses_without_force_and_keeps_earlier_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    make_home(home)
    monkeypatch.chdir(tmp_path)
    code, output = _run_config(home, Path("mq"), "--port", "18883", "--bind", "0.0.0.0")
    assert code == 0, output
    files = MosquittoFiles(tmp_path / "mq")
    conf = files.conf.read_text()
    # --out was relative: every path in the conf is absolute all the same.
    for line in conf.splitlines():
        if line.startswith("#"):
            continue
        for word in line.split()[1:]:
            if word.endswith((".pem", ".key", "acl", ".pid")):
                assert Path(word).is_absolute(), line
    assert "listener 18883 0.0.0.0" in conf.splitlines()
    code, output = _run_config(home, Path("mq"))
    assert code == 2 and "--force" in output
    assert files.conf.read_text() == conf  # untouched
    code, output = _run_config(home, Path("mq"), "--force", "--max-packet-size", "65536")
    assert code == 0, output
    again = files.conf.read_text().splitlines()
    assert "listener 18883 0.0.0.0" in again  # the earlier --port and --bind are kept
    assert "max_packet_size 65536" in again
    saved = json.loads(files.sync_settings.read_text())
    assert saved["config"]["port"] == 18883 and saved["max_packet_size"] == 65536


def test_default_bind_is_loopback_and_the_acl_names_existing_services(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    issue_service_identity(home, "ingest", None, datetime.now(UTC))
    with Registry.open(home / "registry.db") as registry:
        assert service_names(registry) == ["ingest"]
    code, output = _run_config(home, tmp_path / "mq")
    assert code == 0, output
    files = MosquittoFiles(tmp_path / "mq")
    assert "listener 8883 127.0.0.1" in files.conf.read_text().splitlines()
    assert "--bind 0.0.0.0" in output
    acl = files.acl.read_text().splitlines()
    assert "pattern readwrite devices/%u/#" in acl
    at = acl.index("user ingest")
    assert acl[at + 1 : at + 4] == [
        "topic write devices/+/commands",
        "topic read devices/+/telemetry",
        "topic read $SYS/#",
    ]


def test_sync_cli_puts_a_service_issued_later_into_the_acl(broker: Broker) -> None:
    assert "user late" not in broker.files.acl.read_text()
    issue_service_identity(broker.home, "late", None, datetime.now(UTC))
    reloads = broker.log().count("Reloading config.")
    result = runner.invoke(
        app,
        [
            "mosquitto-sync", "--home", str(broker.home),
            "--conf-dir", str(broker.files.folder), "--once",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "user late" in broker.files.acl.read_text().splitlines()
    broker.wait_reloads(reloads + 1)
