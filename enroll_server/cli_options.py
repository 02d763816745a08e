"""Command-line options (and the two helpers) every `fleetpki` sub-app shares, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from enroll_server.home import HomeLayout

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Home folder (default: $FLEETPKI_HOME).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def fail(message: str, code: int = 2) -> NoReturn:
    """One error line on stderr and exit `code` (2: refused input, 1: not found)."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


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
