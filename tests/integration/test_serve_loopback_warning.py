"""`fleetpki serve` bound to loopback (the default) warns when the bundles send devices to a
name elsewhere: they could never connect, and nothing else would say why."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from enroll_server.transport.listen import serves_only_this_machine
from tests.live_server import start_live_server


def test_loopback_bind_with_a_network_name_is_warned_about() -> None:
    warning = serves_only_this_machine("127.0.0.1", "broker.example.lan")
    assert warning is not None
    assert "127.0.0.1 (this machine only)" in warning and "--bind 0.0.0.0" in warning
    assert serves_only_this_machine("::1", "10.0.0.5") is not None


@pytest.mark.parametrize(
    ("bind", "public_host"),
    [("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "broker.lan"),
     ("10.0.0.5", "broker.lan"), ("::", "broker.lan")],
)  # fmt: skip
def test_no_warning_when_devices_can_reach_it(bind: str, public_host: str) -> None:
    assert serves_only_this_machine(bind, public_host) is None


def test_serve_logs_it_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleetpki.server")
    server = start_live_server(tmp_path / "h", public_host="broker.example.lan")
    server.stop()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bundles send devices to 'broker.example.lan'" in r.getMessage() for r in warnings)
