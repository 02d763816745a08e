"""Operator credentials against running servers: rotation and removal take effect at once in
every server, viewers read only, the audit log names the operator, the token file is not a
credential of its own."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.registry import DeviceState
from fleetpki.identity import DeviceId
from tests.est_client import Reply, request
from tests.live_server import LiveServer, start_live_server

runner = CliRunner()


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers on one home and registry, as two nodes (or a restart overlap) would be."""
    first = start_live_server(tmp_path / "home")
    try:
        second = start_live_server(tmp_path / "home")
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def call(
    server: LiveServer, token: str, method: str = "GET", path: str = "/admin/devices"
) -> Reply:
    headers = {"Authorization": f"Bearer {token}"}
    body = None
    if method == "POST":
        body, headers["Content-Type"] = b"{}", "application/json"
    return request(server.admin_url + path, server.client_ssl(), method, body, headers)


def home_of(server: LiveServer) -> str:
    return str(server.layout.root)


def test_rotated_admin_token_is_refused_by_every_running_server(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    first, second = two_servers
    old = first.admin_token
    assert call(first, old).status == 200 and call(second, old).status == 200
    code, stdout, stderr = cli("admin-token", "rotate", "--home", home_of(first))
    assert code == 0, stderr
    assert stdout == ""  # written to H/admin.token, never printed
    new = first.admin_token
    assert new != old and len(new) >= 43
    assert stat.S_IMODE(os.stat(first.layout.admin_token).st_mode) == 0o600
    for server in (first, second):
        assert call(server, old).status == 401
        assert call(server, new).status == 200
    # operator rotate admin does the same.
    assert cli("operator", "rotate", "admin", "--home", home_of(first))[0] == 0
    assert call(second, new).status == 401 and call(second, first.admin_token).status == 200


def test_viewer_reads_and_may_not_change_anything(live_server: LiveServer, tmp_path: Path) -> None:
    token_file = tmp_path / "victor.token"
    code, stdout, stderr = cli(
        "operator", "add", "victor", "--role", "viewer", "--home", home_of(live_server),
        "--out", str(token_file),
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout == "" and stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    viewer = token_file.read_text().strip()
    live_server.mint_device("dev-view")
    assert call(live_server, viewer).status == 200
    assert call(live_server, viewer, path="/admin/devices/dev-view").status == 200
    assert call(live_server, viewer, path="/metrics").status == 200
    for path in ("/admin/devices/dev-view/revoke", "/admin/devices/dev-view/suspend"):
        r = call(live_server, viewer, "POST", path)
        assert r.status == 403 and "viewer" in r.text, (path, r.status, r.text)
    device = live_server.registry.get_device(DeviceId("dev-view"))
    assert device is not None and device.state is DeviceState.PROVISIONED
    # The admin may.
    r = call(live_server, live_server.admin_token, "POST", "/admin/devices/dev-view/suspend")
    assert r.status == 200


def test_removed_operator_is_refused_and_actions_carry_its_name(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    home = home_of(live_server)
    code, token, stderr = cli("operator", "add", "alice", "--role", "admin", "--home", home)
    assert code == 0 and "shown once" in stderr
    token = token.strip()
    live_server.mint_device("dev-alice")
    with caplog.at_level(logging.DEBUG):
        r = call(live_server, token, "POST", "/admin/devices/dev-alice/revoke")
    assert r.status == 200, r.text
    audit = json.loads(call(live_server, token, path="/admin/audit?device=dev-alice").body)
    revoke = [e for e in audit["audit"] if e["action"].startswith("device.revoke")]
    assert revoke and revoke[0]["actor"] == "operator:alice"

    code, stdout, _ = cli("operator", "list", "--home", home, "--json")
    listed = {o["name"]: o["role"] for o in json.loads(stdout)}
    assert listed == {"admin": "admin", "alice": "admin"} and token not in stdout
    assert cli("operator", "remove", "alice", "--home", home)[0] == 0
    assert call(live_server, token).status == 401
    assert cli("operator", "remove", "alice", "--home", home)[0] == 3
    code, _, stderr = cli("operator", "remove", "admin", "--home", home)
    assert code == 2 and "only admin" in stderr
    assert call(live_server, live_server.admin_token).status == 200
    # Neither the registry file nor the log holds the token.
    assert token.encode() not in live_server.layout.registry.read_bytes()
    assert token not in caplog.text


def test_rewriting_the_token_file_is_not_a_new_credential(tmp_path: Path) -> None:
    """The registry is the authority: a token written into H/admin.token by hand is not
    registered at the next start (the old code added it beside the old one)."""
    server = start_live_server(tmp_path / "home")
    old = server.admin_token
    server.stop()
    server.layout.admin_token.write_text("planted-token-" + "x" * 40 + "\n")
    server = start_live_server(tmp_path / "home")
    try:
        assert call(server, "planted-token-" + "x" * 40).status == 401
        assert call(server, old).status == 200
    finally:
        server.stop()


def test_bad_operator_input_changes_nothing(live_server: LiveServer, tmp_path: Path) -> None:
    home = home_of(live_server)
    existing = tmp_path / "exists"
    existing.write_text("keep")
    for args, message in (
        (["--role", "root"], "operator role"),
        (["--role", "viewer", "--out", str(existing)], "exists"),
    ):
        code, _, stderr = cli("operator", "add", "bob", *args, "--home", home)
        assert code == 2 and message in stderr, stderr
    code, _, stderr = cli("operator", "add", "bad name", "--role", "viewer", "--home", home)
    assert code == 2 and "operator name" in stderr
    code, _, stderr = cli("operator", "add", "admin", "--role", "viewer", "--home", home)
    assert code == 2 and "already exists" in stderr
    assert cli("operator", "rotate", "nobody", "--home", home)[0] == 3
    assert existing.read_text() == "keep"
    assert [o.name for o in live_server.registry.list_operators()] == ["admin"]


def test_init_force_retires_the_previous_admin_token(tmp_path: Path) -> None:
    """init --force writes a new H/admin.token over a kept registry: the old token is retired,
    not kept beside the new one."""
    from enroll_server.enrollment.operators import authenticate
    from enroll_server.home.layout import HomeLayout
    from enroll_server.registry import Registry

    home = tmp_path / "home"
    assert cli("init", "--home", str(home))[0] == 0
    layout = HomeLayout(home)
    old = layout.admin_token.read_text().strip()
    code, _, stderr = cli("init", "--home", str(home), "--force")
    assert code == 0, stderr
    new = layout.admin_token.read_text().strip()
    with Registry.open(layout.registry) as registry:
        creds = registry.operator_credentials()
    assert authenticate(creds, old) is None
    found = authenticate(creds, new)
    assert found is not None and found.name == "admin" and len(creds) == 1
