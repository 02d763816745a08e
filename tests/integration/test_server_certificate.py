"""The TLS server certificate of a running service: renewed and reloaded without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.home.layout import HomeLayout, load_home
from enroll_server.pki.keys import KeyType, generate_key, private_key_pem
from enroll_server.pki.profile import DeviceProfile, build_device_certificate
from enroll_server.wiring.server import renew_and_record
from fleetpki.identity import DeviceId
from tests.live_server import make_home, start_live_server

runner = CliRunner()


def presented_serial(port: int, ctx: ssl.SSLContext) -> int:
    """The serial of the certificate a listener on 127.0.0.1:port presents to a new client."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def device_context(layout: HomeLayout, tmp_path: Path, verify: bool = True) -> ssl.SSLContext:
    """A client context with a device certificate of this CA (the broker requires one)."""
    key = generate_key(KeyType.EC_P256)
    cert = build_device_certificate(
        key.public_key(),
        DeviceId("tls-probe"),
        load_home(layout.root).issuer,
        datetime.now(UTC),
        DeviceProfile(),
    )
    (tmp_path / "probe.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "probe.key").write_bytes(private_key_pem(key, None))
    ctx = ssl.create_default_context(cafile=str(layout.root_cert))
    ctx.load_cert_chain(tmp_path / "probe.pem", tmp_path / "probe.key")
    if not verify:  # a certificate issued at a pretended time is not yet valid really
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_a_renewal_reaches_both_listeners_and_open_connections_go_on(tmp_path: Path) -> None:
    server = start_live_server(tmp_path / "home", broker=True, cert_check_interval=0.1)
    try:
        ctx = device_context(server.layout, tmp_path)
        old = presented_serial(server.handle.est_port, ctx)
        assert presented_serial(server.mqtt_port, ctx) == old
        # A keep-alive connection opened before the renewal.
        with (
            socket.create_connection(("127.0.0.1", server.handle.est_port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as open_conn,
        ):
            get = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            open_conn.sendall(get)
            assert open_conn.recv(4096).startswith(b"HTTP/1.1 200")
            # As `fleetpki server-cert renew` does, from outside the server.
            new = renew_and_record(load_home(server.layout.root), datetime.now(UTC), actor="cli")
            assert new.serial_number != old
            assert wait_for(
                lambda: presented_serial(server.handle.est_port, ctx) == new.serial_number
            )
            assert wait_for(lambda: presented_serial(server.mqtt_port, ctx) == new.serial_number)
            assert wait_for(
                lambda: presented_serial(server.handle.admin_port, ctx) == new.serial_number
            )
            open_conn.sendall(get)  # the connection made with the old certificate goes on
            assert open_conn.recv(4096).startswith(b"HTTP/1.1 200")
        (entry,) = [e for e in server.registry.audit_log() if e.action == "tls.renew"]
        assert entry.actor == "cli" and entry.detail["serial"] == f"{new.serial_number:x}"
        metrics = server.metrics()
        assert "fleetpki_server_certificate_reloads_total 1" in metrics
        assert (
            f"fleetpki_server_certificate_not_after_seconds "
            f"{new.not_valid_after_utc.timestamp():.0f}" in metrics
        )
    finally:
        server.stop()


def test_serve_renews_its_own_certificate_once_due(tmp_path: Path) -> None:
    # 300 days on: past 2/3 of the 397-day lifetime.
    def later() -> datetime:
        return datetime.now(UTC) + timedelta(days=300)

    # Read before the server starts: its first check (at once) may renew at any moment after.
    layout = make_home(tmp_path / "home")
    first = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server = start_live_server(tmp_path / "home", clock=later, cert_check_interval=0.1)
    try:
        ctx = device_context(server.layout, tmp_path, verify=False)

        def renewed() -> bool:
            return any(e.action == "tls.renew" for e in server.registry.audit_log())

        assert wait_for(renewed)
        now_on_disk = x509.load_pem_x509_certificate(server.layout.server_cert.read_bytes())
        assert now_on_disk.serial_number != first.serial_number
        assert now_on_disk.not_valid_after_utc > first.not_valid_after_utc + timedelta(days=250)
        assert wait_for(
            lambda: presented_serial(server.handle.est_port, ctx) == now_on_disk.serial_number
        )
        (entry,) = [e for e in server.registry.audit_log() if e.action == "tls.renew"]
        assert entry.actor == "server"
    finally:
        server.stop()


def test_cli_renew_and_show(tmp_path: Path) -> None:
    home = tmp_path / "h"
    assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
    before = (home / "tls/server.pem").read_bytes(), (home / "fleetpki.toml").read_bytes()
    bad = runner.invoke(app, ["server-cert", "renew", "--home", str(home), "--hostname", "a b"])
    assert bad.exit_code == 2
    assert "'a b' is neither an IP address nor a DNS host name" in bad.output
    # Nothing written by the refused request.
    assert ((home / "tls/server.pem").read_bytes(), (home / "fleetpki.toml").read_bytes()) == before
    r = runner.invoke(
        app, ["server-cert", "renew", "--home", str(home), "--hostname", "gw.plant.lan"]
    )
    assert r.exit_code == 0, r.output
    assert "renewed" in r.output and "gw.plant.lan" in r.output
    assert '"gw.plant.lan"' in (home / "fleetpki.toml").read_text()  # kept for the next renewal
    shown = runner.invoke(app, ["server-cert", "show", "--home", str(home), "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"gw.plant.lan"' in shown.output and '"expired": false' in shown.output


def test_init_refuses_a_bad_hostname_and_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "h"
    r = runner.invoke(app, ["init", "--home", str(home), "--hostname", "under_score.lan"])
    assert r.exit_code == 2
    assert "--hostname 'under_score.lan' is neither" in r.output
    assert not home.exists()
    shown = runner.invoke(app, ["server-cert", "show", "--home", str(home)])
    assert shown.exit_code == 2 and "not initialized: run `fleetpki init" in shown.output


async def test_the_broker_alone_loads_a_renewed_certificate(tmp_path: Path) -> None:
    """`fleetpki broker` (serve_until_signal) in-process: it reloads what serve or the CLI
    renewed, and never renews itself (it holds no CA key)."""
    from enroll_server.broker.cli import broker_config_for_home, serve_until_signal

    layout = make_home(tmp_path / "home")
    port = free_port()
    config = broker_config_for_home(layout.root, bind="127.0.0.1", port=port)
    task = asyncio.create_task(serve_until_signal(config, None, cert_check_interval=0.1))
    try:
        ctx = device_context(layout, tmp_path)

        async def serial() -> int | None:
            try:
                return await asyncio.to_thread(presented_serial, port, ctx)
            except OSError:
                return None  # not listening yet

        deadline = time.monotonic() + 10
        old = await serial()
        while old is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            old = await serial()
        assert old is not None, "the broker did not start"
        new = await asyncio.to_thread(
            renew_and_record, load_home(layout.root), datetime.now(UTC), actor="cli"
        )
        while await serial() != new.serial_number and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await serial() == new.serial_number != old
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_broker_alone_trusts_a_new_issuing_ca_after_a_rollover(tmp_path: Path) -> None:
    """`fleetpki broker` loads chain.pem again when `fleetpki ca rollover` changes it: a
    device certificate of the new issuing CA, presented alone, is admitted without a restart."""
    from enroll_server.broker.cli import broker_config_for_home, serve_until_signal
    from enroll_server.registry import Registry
    from tests.integration.broker_harness import PAHO_ACCEPTED, Creds, PahoDevice
    from tests.pki_helpers import issued_record

    layout = make_home(tmp_path / "home")
    port = free_port()
    config = broker_config_for_home(layout.root, bind="127.0.0.1", port=port)
    task = asyncio.create_task(serve_until_signal(config, None, cert_check_interval=0.1))
    try:
        # The broker listens before the rollover starts: a start that reads tls/ while the
        # rollover swaps in a new server pair is not this test's subject.
        deadline = time.monotonic() + 20
        while True:
            if task.done():
                task.result()  # the broker's own error, if it failed to start
                raise AssertionError("the broker stopped before listening")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert time.monotonic() < deadline, "the broker is not listening"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        rolled = await asyncio.to_thread(
            CliRunner().invoke, app, ["ca", "rollover", "--home", str(layout.root)]
        )
        assert rolled.exit_code == 0, rolled.output
        now = datetime.now(UTC)
        key = generate_key(KeyType.EC_P256)
        profile = DeviceProfile(validity=timedelta(hours=1), backdate=timedelta(minutes=1))
        cert = build_device_certificate(
            key.public_key(), DeviceId("dev-new-ca"), load_home(layout.root).issuer, now, profile
        )
        with Registry.open(load_home(layout.root).registry) as registry:
            registry.add_device(DeviceId("dev-new-ca"), now=now, actor="test")
            registry.record_issuance(
                issued_record(cert, "dev-new-ca"),
                consume_token_hash=None,
                supersedes_serial=None,
                now=now,
                actor="test",
            )
        cert_path, key_path = tmp_path / "dev.pem", tmp_path / "dev.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(private_key_pem(key, None))
        creds = Creds("dev-new-ca", cert, key, cert_path, key_path)
        deadline = time.monotonic() + 10
        while True:
            device = PahoDevice(creds, port, layout.root_cert)
            try:
                code = await device.connect()
            except OSError:
                code = None  # not listening yet
            finally:
                await device.close()
            if code == PAHO_ACCEPTED or time.monotonic() > deadline or task.done():
                break
            await asyncio.sleep(0.1)
        assert not task.done(), task.exception()
        assert code == PAHO_ACCEPTED
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
