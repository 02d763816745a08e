"""`batch create` warns (stderr, exit 0) when the server name its bundles carry does not
resolve here; names under .invalid never resolve (RFC 6761 6.4), so no public host is asked."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from enroll_server.cli.app import app
from provisioning.host_check import unresolvable

runner = CliRunner()
NOWHERE = "broker.fleetpki-test.invalid"


def _create(tmp_path: Path, *hostname: str) -> tuple[int, str, str]:
    home = str(tmp_path / "home")
    init = runner.invoke(app, ["init", "--home", home, *hostname])
    assert init.exit_code == 0, init.output
    r = runner.invoke(
        app,
        ["batch", "create", "--home", home, "--count", "2", "--out", str(tmp_path / "lot")],
    )
    return r.exit_code, r.stdout, r.stderr


def test_unresolvable_bundle_host_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    code, _, stderr = _create(tmp_path, "--hostname", NOWHERE)
    assert code == 0, stderr
    assert f"warning: the bundles send devices to '{NOWHERE}', which does not resolve" in stderr
    assert "public_host" in stderr
    bundles = sorted(p.name for p in (tmp_path / "lot").iterdir() if p.is_dir())
    assert len(bundles) == 2  # the batch itself is made
    assert NOWHERE in (tmp_path / "lot" / bundles[0] / "agent.toml").read_text()


def test_resolvable_bundle_host_gives_no_warning(tmp_path: Path) -> None:
    code, _, stderr = _create(tmp_path)  # public_host localhost
    assert code == 0 and "warning" not in stderr, stderr


def test_addresses_resolve_without_asking_and_names_are_checked() -> None:
    assert unresolvable("10.0.0.5") is None and unresolvable("::1") is None
    assert unresolvable("localhost") is None
    assert unresolvable(NOWHERE) is not None


def test_a_hung_resolver_costs_the_timeout_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A resolver that never answers cannot be had cheaply for real: stand in for it.
    release = threading.Event()

    def hang(*args: object, **kwargs: object) -> list[object]:
        release.wait(10)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    started = time.monotonic()
    try:
        why = unresolvable("slow.example.invalid", timeout=0.2)
    finally:
        release.set()
    assert why == "no answer from the resolver within 0.2 s"
    assert time.monotonic() - started < 2
