"""`fleetpki broker rabbitmq-config` refuses bad input before writing anything."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from enroll_server.broker.rabbitmq_auth_routes import SECRET_FILE, SYNC_SECRET_FILE
from enroll_server.broker.rabbitmq_cli import app
from enroll_server.cli.exit_codes import ExitCode
from tests.live_server import make_home


def test_bad_auth_url_or_port_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    out = tmp_path / "rabbitmq"
    runner = CliRunner()
    for extra, says in (
        (["--auth-url", "http://localhost:8444"], "is not https://HOST:PORT"),
        (["--auth-url", "https://localhost:8444/admin"], "is not https://HOST:PORT"),
        (["--port", "70000"], "port 70000 is not in 1..65535"),
    ):
        result = runner.invoke(
            app, ["rabbitmq-config", "--home", str(home), "--out", str(out), *extra]
        )
        assert result.exit_code == ExitCode.USAGE, result.output
        assert says in result.output
        assert not out.exists()
        assert not (home / SECRET_FILE).exists() and not (home / SYNC_SECRET_FILE).exists()


def test_an_existing_folder_needs_force(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    out = tmp_path / "rabbitmq"
    runner = CliRunner()
    argv = ["rabbitmq-config", "--home", str(home), "--out", str(out), "--user", "root"]
    assert runner.invoke(app, argv).exit_code == 0
    before = (out / "rabbitmq.conf").read_bytes()
    again = runner.invoke(app, [*argv, "--port", "9999"])
    assert again.exit_code == ExitCode.USAGE and "pass --force" in again.output
    assert (out / "rabbitmq.conf").read_bytes() == before
    assert runner.invoke(app, [*argv, "--port", "9999", "--force"]).exit_code == 0
    assert "mqtt.listeners.ssl.default = 127.0.0.1:9999" in (out / "rabbitmq.conf").read_text()
