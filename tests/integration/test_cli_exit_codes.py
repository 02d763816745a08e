"""One exit-code table for every `fleetpki` command (enroll_server.cli.exit_codes, README "Exit
codes"): the same kind of error gives the same code whichever command met it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.cli.exit_codes import ExitCode
from tests.live_server import make_home

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("exit") / "home"
    make_home(path)
    return str(path)


@pytest.mark.parametrize(
    "args",
    [
        ["device", "show", "ghost"],
        ["device", "revoke", "ghost"],
        ["device", "suspend", "ghost"],
        ["device", "resume", "ghost"],
        ["batch", "show", "no-such-batch"],
        ["batch", "reissue-token", "ghost", "--stdout"],
        ["service", "show", "ghost"],
        ["operator", "rotate", "ghost"],
    ],
)
def test_unknown_device_or_batch_is_not_found_everywhere(home: str, args: list[str]) -> None:
    r = runner.invoke(app, [*args, "--home", home])
    assert r.exit_code == ExitCode.NOT_FOUND == 3, r.output
    assert "is not registered" in r.stderr  # one wording for an unknown id
    assert "does not exist" not in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["device", "list"],
        ["batch", "list"],
        ["batch", "create", "--count", "1"],
        ["service", "list"],
        ["server-cert", "show"],
    ],
)
def test_uninitialized_home_is_refused_input_everywhere(tmp_path: Path, args: list[str]) -> None:
    r = runner.invoke(app, [*args, "--home", str(tmp_path / "nothing")])
    assert r.exit_code == ExitCode.USAGE == 2, r.output
    assert "not initialized" in r.stderr
