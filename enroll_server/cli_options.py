"""Command-line options (and the two helpers) every `fleetpki` sub-app shares, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from enroll_server.exit_codes import fail
from enroll_server.listen import MAX_PORT
from enroll_server.registry.models import REVOKE_REASON_OPTIONS

__all__ = [
    "HomeOpt",
    "JsonOpt",
    "ReasonOpt",
    "fail",
    "init_port",
    "initialized_layout",
    "serve_port",
]

if TYPE_CHECKING:
    from enroll_server.home import HomeLayout

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Home folder (default: $FLEETPKI_HOME).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
ReasonOpt = Annotated[
    str,
    typer.Option(
        "--reason", help=f"Revocation reason (RFC 5280 5.3.1): {', '.join(REVOKE_REASON_OPTIONS)}."
    ),
]


def serve_port(help: str) -> Any:
    """A port to listen on now: 0..65535, 0 for any free port (a usage error otherwise)."""
    return typer.Option(min=0, max=MAX_PORT, help=f"{help} 0: any free port.")


def init_port(help: str) -> Any:
    """A port written into fleetpki.toml and certificate URLs: 1..65535 (0 names no port)."""
    return typer.Option(min=1, max=MAX_PORT, help=help)


def initialized_layout(home: Path | None) -> HomeLayout:
    """The home folder's layout; exits with a message if it is not set or not initialized."""
    from enroll_server.home import HomeError, HomeLayout, resolve_home

    try:
        layout = HomeLayout(resolve_home(home))
    except HomeError as exc:
        fail(str(exc))
    if not layout.config.exists():
        fail(f"{layout.root}: not initialized: run `fleetpki init --home {layout.root}` first")
    return layout
