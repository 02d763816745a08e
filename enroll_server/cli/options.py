"""Command-line options (and the two helpers) every `fleetpki` sub-app shares, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from enroll_server.cli.exit_codes import ExitCode, fail
from enroll_server.registry.errors import RegistryError, RegistryUnavailable
from enroll_server.registry.models import REVOKE_REASON_OPTIONS
from enroll_server.transport.listen import MAX_PORT

__all__ = [
    "HomeOpt",
    "JsonOpt",
    "ReasonOpt",
    "RegistryOpt",
    "fail",
    "fail_registry",
    "init_port",
    "initialized_layout",
    "serve_port",
]

if TYPE_CHECKING:
    from enroll_server.home.layout import HomeLayout

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Home folder (default: $FLEETPKI_HOME).", show_default=False),
]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="The registry: postgresql://USER@HOST/DB (shared by several nodes) or an SQLite "
        "file (default: $FLEETPKI_REGISTRY, else fleetpki.toml's registry, else H/registry.db). "
        "No password here: registry_password_file, PGPASSWORD or ~/.pgpass.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
ReasonOpt = Annotated[
    str,
    typer.Option(
        "--reason", help=f"Revocation reason (RFC 5280 5.3.1): {', '.join(REVOKE_REASON_OPTIONS)}."
    ),
]


def fail_registry(exc: RegistryError) -> NoReturn:
    """Exit on a registry that cannot be used: unreachable or refusing the login (1), or with
    no schema or another version's (2, as for an uninitialized home); the message names it,
    never with a password."""
    fail(str(exc), ExitCode.FAILED if isinstance(exc, RegistryUnavailable) else ExitCode.USAGE)


def serve_port(help: str) -> Any:
    """A port to listen on now: 0..65535, 0 for any free port (a usage error otherwise)."""
    return typer.Option(min=0, max=MAX_PORT, help=f"{help} 0: any free port.")


def init_port(help: str) -> Any:
    """A port written into fleetpki.toml and certificate URLs: 1..65535 (0 names no port)."""
    return typer.Option(min=1, max=MAX_PORT, help=help)


def initialized_layout(home: Path | None) -> HomeLayout:
    """The home folder's layout; exits with a message if it is not set or not initialized."""
    from enroll_server.home.layout import HomeError, HomeLayout, resolve_home

    try:
        layout = HomeLayout(resolve_home(home))
    except HomeError as exc:
        fail(str(exc))
    if not layout.config.exists():
        fail(f"{layout.root}: not initialized: run `fleetpki init --home {layout.root}` first")
    return layout
