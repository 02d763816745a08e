"""The README, `fleetpki.toml` and `serve --help` agree on where `fleetpki serve` listens by
default (loopback) and say how to serve a network."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.home.config import ServerConfig, load_config, render_config

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_names_the_default_listen_addresses() -> None:
    cfg = ServerConfig()
    assert cfg.bind == "127.0.0.1"  # the safe default stays
    for url in (
        f"https://{cfg.bind}:{cfg.est_port}",
        f"http://{cfg.bind}:{cfg.http_port}",
        f"{cfg.bind}:{cfg.mqtt_port}",
    ):
        assert url in README, url
    assert "https://:" not in README and "http://:" not in README
    assert "fleetpki serve --bind 0.0.0.0" in README


def test_config_file_and_help_say_how_to_serve_a_network(tmp_path: Path) -> None:
    path = tmp_path / "fleetpki.toml"
    path.write_text(render_config(ServerConfig()))
    text = path.read_text()
    bind_line = next(line for line in text.splitlines() if line.startswith("bind ="))
    assert "0.0.0.0" in bind_line and "network" in bind_line
    assert load_config(path).bind == "127.0.0.1"  # the comment does not change the value
    help_text = " ".join(CliRunner().invoke(app, ["serve", "--help"]).output.split())
    assert "0.0.0.0" in help_text
