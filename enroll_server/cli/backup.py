"""`fleetpki backup` and `fleetpki restore` (enroll_server/home/backup.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode, fail
from enroll_server.cli.options import HomeOpt, initialized_layout

console = stdout_console(soft_wrap=True)


def backup(
    out: Annotated[Path, typer.Option("--out", help="The backup file to write (0600).")],
    home: HomeOpt = None,
) -> None:
    """One file with the home (CA keys included: keep it as safe as the CA) and a consistent
    snapshot of the registry (SQLite's online backup, or pg_dump), taken while servers run."""
    from enroll_server.home.backup import BackupError, backup_home

    layout = initialized_layout(home)
    try:
        summary = backup_home(layout.root, out, datetime.now(UTC))
    except BackupError as exc:
        fail(str(exc), ExitCode.FAILED)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}", ExitCode.FAILED)
    console.print(f"backup {out}: {summary.files} files and the {summary.registry} registry")


def restore(
    archive: Annotated[Path, typer.Argument(help="A file written by `fleetpki backup`.")],
    home: Annotated[Path, typer.Option("--home", help="The new home (absent or empty).")],
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="An empty PostgreSQL database for a PostgreSQL backup (default: its URL).",
        ),
    ] = None,
) -> None:
    """A new home from a backup; nothing is written unless all of it is read and checked."""
    from enroll_server.home.backup import BackupError, restore_home

    try:
        summary = restore_home(archive, home, registry)
    except BackupError as exc:
        fail(str(exc), ExitCode.USAGE)
    console.print(f"restored {home} from {archive}: {summary.files} files, {summary.registry}")


def register(app: typer.Typer) -> None:
    app.command("backup")(backup)
    app.command("restore")(restore)
