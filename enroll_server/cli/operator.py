"""`fleetpki operator add|list|remove|rotate` and `fleetpki admin-token rotate`: operator
credentials for the admin API (enroll_server.enrollment.operators)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode
from enroll_server.cli.options import HomeOpt, JsonOpt, fail, initialized_layout
from enroll_server.enrollment.operators import (
    ADMIN_OPERATOR,
    add_operator,
    rotate_operator,
    write_token_file,
)
from enroll_server.home.layout import HomeLayout, registry_location
from enroll_server.registry import (
    InvalidValue,
    LastAdmin,
    OperatorRole,
    Registry,
    RegistryError,
    UnknownOperator,
)
from enroll_server.registry.connection import parse_enum

ACTOR = "cli"

app = typer.Typer(
    help="Operator credentials for the admin API: add, list, remove, rotate (roles admin, viewer).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
admin_token_app = typer.Typer(
    help="The admin token in HOME/admin.token (operator 'admin').",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = stdout_console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

NameArg = Annotated[str, typer.Argument(help="Operator name (letters, digits, '-', '_').")]
TokenOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Write the token to this new file (0600) instead of printing it once on stdout.",
    ),
]


@contextmanager
def _registry(home: Path | None) -> Iterator[tuple[HomeLayout, Registry]]:
    layout = initialized_layout(home)
    try:
        with Registry.open(registry_location(layout)) as registry:
            yield layout, registry
    except UnknownOperator as exc:
        fail(str(exc), ExitCode.NOT_FOUND)
    except (LastAdmin, InvalidValue, RegistryError) as exc:
        fail(str(exc))


def _check_out(out: Path | None) -> None:
    """Refused before anything changes: a token file never replaces an existing file."""
    if out is None:
        return
    if out.exists() or out.is_symlink():
        fail(f"{out}: exists; choose a new file for the token")
    if not out.parent.is_dir():
        fail(f"{out.parent}: no such folder")


def _deliver(token: str, out: Path | None, what: str) -> None:
    if out is None:
        err.print(f"{what}; its token, shown once (the registry keeps only a hash of it):")
        sys.stdout.write(token + "\n")
        return
    try:
        write_token_file(out, token)
    except OSError as exc:
        # The registry already holds the new token's hash: hand the token over here rather
        # than lose it (for 'admin', the only admin, that would lock the admin API).
        sys.stdout.write(token + "\n")
        fail(f"{what}, but {out} could not be written ({exc.strerror or exc}); the token is above")
    err.print(f"{what}; token written to {out} (0600)")


@app.command("add")
def operator_add(
    name: NameArg,
    role: Annotated[str, typer.Option("--role", help="admin (everything) or viewer (read only).")],
    home: HomeOpt = None,
    out: TokenOutOpt = None,
) -> None:
    """Add an operator; its token is printed once (or written to --out) and stored hashed."""
    try:
        kind = parse_enum(OperatorRole, "operator role", role)
    except InvalidValue as exc:
        fail(str(exc))
    _check_out(out)
    with _registry(home) as (_, registry):
        token = add_operator(registry, name, kind, datetime.now(UTC), actor=ACTOR)
    _deliver(token, out, f"operator {name} added ({kind.value})")


@app.command("list")
def operator_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Operators: name, role, when added, when the token was last rotated (never the token)."""
    with _registry(home) as (_, registry):
        operators = registry.list_operators()
    rows = [
        {
            "name": o.name,
            "role": o.role.value,
            "created_at": o.created_at.isoformat(),
            "rotated_at": o.rotated_at.isoformat() if o.rotated_at else None,
        }
        for o in operators
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("operator", "role", "added", "token rotated")
    for r in rows:
        table.add_row(r["name"], r["role"], r["created_at"], r["rotated_at"] or "-")
    console.print(table)


@app.command("remove")
def operator_remove(name: NameArg, home: HomeOpt = None) -> None:
    """Remove an operator: its token is refused by every running server from now on."""
    with _registry(home) as (_, registry):
        registry.remove_operator(name, datetime.now(UTC), actor=ACTOR)
    err.print(f"operator {name} removed; its token no longer works")


def _rotate(name: str, home: Path | None, out: Path | None) -> None:
    layout = initialized_layout(home)
    if name == ADMIN_OPERATOR and out is None:
        out = layout.admin_token  # admin's token lives there; rewritten in place
    else:
        _check_out(out)
    with _registry(home) as (_, registry):
        token = rotate_operator(registry, name, datetime.now(UTC), actor=ACTOR)
    _deliver(token, out, f"operator {name}: new token, the old one is refused from now on")


@app.command("rotate")
def operator_rotate(name: NameArg, home: HomeOpt = None, out: TokenOutOpt = None) -> None:
    """A new token for the operator; the old one stops working at once, in every running
    server. For 'admin' the new token replaces HOME/admin.token unless --out names a file."""
    _rotate(name, home, out)


@admin_token_app.command("rotate")
def admin_token_rotate(home: HomeOpt = None) -> None:
    """A new admin token in HOME/admin.token; the old one stops working at once."""
    _rotate(ADMIN_OPERATOR, home, None)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="operator")
    root.add_typer(admin_token_app, name="admin-token")
