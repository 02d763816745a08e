"""The `fleetpki` operator CLI: the typer app, its sub-apps, shared options, output, exit codes."""

from __future__ import annotations


def main() -> None:
    """The `fleetpki` command (pyproject [project.scripts]); the app loads only when it runs,
    so a sub-app importing `enroll_server.cli.options` does not load every other one."""
    from enroll_server.cli.app import main as run

    run()
