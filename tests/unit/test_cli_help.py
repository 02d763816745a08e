"""`fleetpki ... --help` reads plainly: no `{device_id}`, `<bool>` or `<list[str]>` type
labels, and docstring paragraphs reflowed (no ragged breaks from the source's wrapping)."""

from __future__ import annotations

from typing import Any

import typer.main
from typer.testing import CliRunner

from enroll_server.cli.app import app
from enroll_server.cli.help import reflow

runner = CliRunner()


def _paths(command: Any, path: list[str]) -> list[list[str]]:
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        found += _paths(sub, [*path, name])
    return found


def _help(path: list[str]) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, (path, result.output)
    return result.output


def test_every_help_page_has_plain_metavars() -> None:
    paths = _paths(typer.main.get_command(app), [])
    assert len(paths) > 30  # every sub-app is mounted and walked
    for path in paths:
        text = _help(path)
        for label in ("{", "<bool>", "<list["):
            assert label not in text, (path, label, text)


def test_usage_names_arguments_and_repeatable_options_plainly() -> None:
    assert "Usage: fleetpki device show [OPTIONS] DEVICE_ID" in _help(["device", "show"])
    assert "Usage: fleetpki batch show [OPTIONS] BATCH_ID" in _help(["batch", "show"])
    assert "--hostname" in (init := _help(["init"])) and "HOSTNAME" in init


def test_docstring_paragraphs_are_reflowed() -> None:
    # The source breaks this docstring after "enroll"; the commands list of `fleetpki --help`
    # showed that break as a line of its own.
    demo = typer.main.get_command(app).commands["demo"]  # type: ignore[attr-defined]
    assert "25 agents enroll and stream telemetry" in demo.help
    assert "\n" not in demo.help
    docstring = "One sentence\n    wrapped at the source.\n\n    - a list\n    - kept\n    "
    assert reflow(docstring) == ("One sentence wrapped at the source.\n\n- a list\n- kept")
