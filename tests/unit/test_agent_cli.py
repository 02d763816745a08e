"""The agent's command line, its systemd unit, and the base install's import footprint."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.cli import main
from device_agent.exit_codes import ExitCode
from tests.unit.test_agent_config import BUNDLE

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "device_agent" / "fleetpki-agent.service"
SERVER_ONLY = ("aiohttp", "typer", "rich", "psycopg", "amqtt", "enroll_server")


def test_base_install_needs_no_server_dependencies() -> None:
    """Importing every agent module pulls in none of the [server] extra's packages."""
    code = (
        "import sys, device_agent.cli, device_agent.agent, device_agent.status;"
        f"print([m for m in {SERVER_ONLY!r} if m in sys.modules])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_usage_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == ExitCode.USAGE
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == ExitCode.CONFIG
    bad = tmp_path / "agent.toml"
    bad.write_text(BUNDLE.replace("port = 8883", 'port = "x"'))
    assert main(["enroll", "--config", str(bad)]) == ExitCode.CONFIG


def test_help_documents_exit_codes() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0
    for line in ("3  revoked or refused", "5  no valid certificate and no token", "6  another"):
        assert line in r.stdout


def test_status_of_a_device_never_enrolled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(BUNDLE)
    (tmp_path / "token").write_text("t\n")
    assert main(["status", "--config", str(cfg), "--json"]) == ExitCode.REBOOTSTRAP
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "dev-000001"
    assert report["identity"] == "not enrolled"
    assert report["token_present"] is True
    assert "t\n" not in json.dumps(report)  # the token itself is never printed


def test_status_of_a_broken_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(BUNDLE)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "identity.json").write_text("{")
    assert main(["status", "--config", str(cfg)]) == ExitCode.CONFIG
    assert "identity.json" in capsys.readouterr().out


def test_systemd_unit() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["Restart"] == "on-failure"
    assert set(service["RestartPreventExitStatus"].split()) == {"3", "4", "5"}
    assert "fleetpki-agent run --config" in service["ExecStart"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert service[key] == value
    assert service["User"] != "root"
    assert parser["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    r = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    # The only acceptable complaint in a test box: the install path does not exist here.
    problems = [line for line in r.stderr.splitlines() if line and "is not executable" not in line]
    assert problems == []


@pytest.mark.parametrize(
    "line",
    [
        ["run", "--config", "a.toml"],
        ["run", "-c", "/etc/fleetpki/agent.toml", "-v"],
        ["run", "--config=x/agent.toml", "--verbose"],
        ["enroll", "--force", "-c", "a.toml"],
        ["enroll", "--config", "a.toml"],
        ["status", "--json", "--config", "a.toml", "-v"],
        ["status", "-c", "a.toml"],
    ],
)
def test_plain_command_lines_parse_as_argparse_does(line: list[str]) -> None:
    from device_agent.cli import _parser, _plain_args

    plain = _plain_args(line)
    assert plain is not None
    assert vars(plain) == vars(_parser().parse_args(line))


@pytest.mark.parametrize(
    "line",
    [
        [],
        ["--help"],
        ["run"],  # --config missing: argparse explains
        ["run", "--config"],
        ["run", "--config", "-v"],
        ["run", "--config="],
        ["run", "--conf", "a.toml"],  # an abbreviation: argparse's rules
        ["run", "-c", "a", "-c", "b"],
        ["run", "--force", "-c", "a.toml"],  # --force belongs to enroll
        ["status", "-c", "a.toml", "--help"],
        ["run", "-vc", "a.toml"],
        ["run", "-c", "a.toml", "--", "x"],
        ["start", "-c", "a.toml"],
    ],
)
def test_anything_else_is_left_to_argparse(line: list[str]) -> None:
    from device_agent.cli import _plain_args

    assert _plain_args(line) is None


def test_run_does_not_load_argparse() -> None:
    """An agent idle for weeks does not keep argparse (and gettext) for its command line."""
    code = (
        "import sys; from device_agent.cli import main;"
        "rc = main(['run', '--config', 'missing/agent.toml']);"
        "print(rc, 'argparse' in sys.modules, 'gettext' in sys.modules)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.stdout.split() == [str(int(ExitCode.CONFIG)), "False", "False"], r.stderr
