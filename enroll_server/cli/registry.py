"""`fleetpki registry copy|migrate|show`: move a fleet between registries, upgrade a shared one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode
from enroll_server.cli.options import HomeOpt, RegistryOpt, fail, fail_registry
from enroll_server.registry import InvalidValue, Registry, RegistryError, schema
from enroll_server.registry.copy import copy_registry
from enroll_server.registry.errors import (
    CopyMismatch,
    NoSchema,
    RegistryUnavailable,
    SchemaTooNew,
    SchemaTooOld,
    TargetNotEmpty,
)
from enroll_server.registry.location import PostgresLocation, RegistryLocation, parse_location

app = typer.Typer(
    help="The registry itself: copy a fleet into a new one (SQLite to PostgreSQL), migrate.",
    no_args_is_help=True,
)
console = stdout_console(soft_wrap=True)
_UNUSABLE = (RegistryUnavailable, NoSchema, SchemaTooOld, SchemaTooNew)


def _location(option: str, text: str, password_file: Path | None = None) -> RegistryLocation:
    try:
        location = parse_location(text)
    except InvalidValue as exc:
        fail(f"{option}: {exc.why}")
    if isinstance(location, PostgresLocation) and password_file is not None:
        return PostgresLocation(location.url, password_file)
    return location


def _home_registry(home: Path | None, registry: str | None) -> RegistryLocation:
    """--registry if given, else the home's registry (home.registry_location)."""
    from enroll_server.cli.options import initialized_layout
    from enroll_server.home.layout import registry_location

    if registry is not None and home is None:
        return _location("--registry", registry)
    return registry_location(initialized_layout(home), flag=registry)


@app.command("copy")
def copy(
    source: Annotated[
        str, typer.Option("--from", help="The registry to copy: sqlite:///H/registry.db or a URL.")
    ],
    target: Annotated[
        str,
        typer.Option(
            "--to", help="An empty registry: postgresql://USER@HOST/DB (schema made if missing)."
        ),
    ],
    to_password_file: Annotated[
        Path | None,
        typer.Option(help="A file holding the target's password (else PGPASSWORD, ~/.pgpass)."),
    ] = None,
) -> None:
    """Copy devices, certificates, tokens, batches, audit, events and operators into an empty
    registry, in one transaction, then check each table's row count and checksum.

    Stop every server using the source first. A target that holds anything is refused with
    nothing written.
    """
    src_at = _location("--from", source)
    dst_at = _location("--to", target, to_password_file)
    if str(src_at) == str(dst_at):
        fail("--from and --to name the same registry")
    if not isinstance(src_at, PostgresLocation) and not src_at.path.exists():
        fail(f"--from {src_at}: no such file")
    try:
        with (
            Registry.open(src_at) as src,
            Registry.open(dst_at, create=True) as dst,
        ):
            sums = copy_registry(
                src, dst, lambda table, rows: console.print(f"  {table:<13} {rows:>9} rows")
            )
    except _UNUSABLE as exc:
        fail_registry(exc)
    except TargetNotEmpty as exc:
        fail(str(exc))
    except CopyMismatch as exc:
        fail(str(exc), ExitCode.FAILED)
    except RegistryError as exc:
        fail(str(exc), ExitCode.FAILED)
    for s in sums:
        console.print(f"  verified {s.table:<13} {s.rows:>9} rows  sha256-sum {s.sha256[:16]}")
    console.print(f"[green]copied[/green] {src_at} -> {dst_at}")


@app.command("migrate")
def migrate(home: HomeOpt = None, registry: RegistryOpt = None) -> None:
    """Bring a registry to this fleetpki's schema version.

    An SQLite registry migrates by itself when opened; a shared (PostgreSQL) one only by
    this command, once every node runs the new fleetpki (a node refuses an older schema).
    """
    location = _home_registry(home, registry)
    try:
        Registry.open(location, upgrade=True).close()
    except _UNUSABLE as exc:
        fail_registry(exc)
    console.print(f"registry {location}: schema version {schema.LATEST_VERSION}")
