"""`fleetpki device revoke|suspend|resume` say what happened, a repeat included ("nothing to
do", exit 0), and `--reason` errors list the spellings the help shows."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from enroll_server.cli.app import app
from tests.live_server import make_home

runner = CliRunner()


def _home_with_device(tmp_path: Path) -> str:
    home = str(tmp_path / "home")
    make_home(Path(home))
    r = runner.invoke(
        app,
        [
            "batch",
            "create",
            "--home",
            home,
            "--count",
            "1",
            "--prefix",
            "st-",
            "--out",
            str(tmp_path / "lot"),
        ],
    )
    assert r.exit_code == 0, r.output
    return home


def test_repeats_and_no_ops_say_nothing_to_do(tmp_path: Path) -> None:
    home = _home_with_device(tmp_path)

    def device(*args: str) -> tuple[int, str]:
        r = runner.invoke(app, ["device", *args, "st-000001", "--home", home])
        return r.exit_code, r.stdout.strip()

    assert device("resume") == (0, "st-000001: not suspended (state provisioned): nothing to do")
    code, text = device("suspend")
    assert code == 0 and text.startswith("st-000001: suspended: 0 certificate(s) on hold"), text
    assert device("suspend") == (0, "st-000001: already suspended: nothing to do")
    code, text = device("resume")
    assert code == 0 and text.startswith("st-000001: resumed: 0 certificate(s)"), text
    code, text = device("revoke")
    assert code == 0 and text.startswith("st-000001: revoked: 0 certificate(s) revoked"), text
    code, text = device("revoke")
    assert code == 0 and text.startswith("st-000001: already revoked: nothing to do"), text
    r = runner.invoke(app, ["device", "resume", "st-000001", "--home", home])
    assert r.exit_code == 2 and "device st-000001 is revoked" in r.stderr


def test_bad_reason_lists_the_spellings_the_help_shows(tmp_path: Path) -> None:
    home = _home_with_device(tmp_path)
    r = runner.invoke(app, ["device", "revoke", "st-000001", "--home", home, "--reason", "bored"])
    assert r.exit_code == 2
    assert "key-compromise" in r.stderr and "cessation-of-operation" in r.stderr
    assert "keyCompromise" not in r.stderr and "certificate-hold" not in r.stderr
    r = runner.invoke(
        app, ["device", "revoke", "st-000001", "--home", home, "--reason", "certificate-hold"]
    )
    assert r.exit_code == 2 and "use suspend and resume" in r.stderr


def test_service_revoke_twice_says_nothing_to_do(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    make_home(Path(home))
    issued = runner.invoke(
        app, ["service", "issue", "backend", "--home", home, "--out", str(tmp_path / "svc")]
    )
    assert issued.exit_code == 0, issued.output
    first = runner.invoke(app, ["service", "revoke", "backend", "--home", home])
    assert first.exit_code == 0
    assert first.stdout.startswith("service backend: revoked: 1 certificate(s) revoked")
    again = runner.invoke(app, ["service", "revoke", "backend", "--home", home])
    assert again.exit_code == 0
    assert again.stdout.startswith("service backend: already revoked: nothing to do"), again.stdout


def test_every_reason_option_lists_the_same_spellings() -> None:
    from enroll_server.registry.models import REVOKE_REASON_OPTIONS

    for command in ("device", "cert", "service", "batch"):
        result = runner.invoke(app, [command, "revoke", "--help"], env={"COLUMNS": "200"})
        text = " ".join(result.output.replace("\u2502", " ").split())  # box edges out
        assert ", ".join(REVOKE_REASON_OPTIONS) in text, (command, text)
