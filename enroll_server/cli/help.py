"""How `fleetpki ... --help` reads: plain metavars and help paragraphs reflowed to the width.

Typer's rich help shows a flag's type as `<bool>`, a repeatable option's as `<list[str]>`, a
required argument as `{device_id}` in the usage line, and keeps a docstring's hard line
breaks, so help wrapped at the source's 100 columns comes out ragged. `tidy_help(app)` gives
every command and group of the app the classes below, which fix that in one place.
"""

from __future__ import annotations

import inspect
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


def reflow(text: str | None) -> str | None:
    """A docstring's paragraphs, each on one line (the help formatter wraps to the terminal).

    A line starting with "-", "*" or whitespace (a list item, an example) keeps its break.
    """
    if not text:
        return text
    paragraphs: list[str] = []
    for block in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in block.splitlines():
            if lines and line.strip() and not line.startswith(("-", "*", " ", "\t", "\b")):
                lines[-1] = f"{lines[-1]} {line.strip()}"
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _tidy_params(params: list[Any]) -> list[Any]:
    for param in params:
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()  # DEVICE_ID, as in the README
        elif getattr(param, "is_flag", False):
            param.metavar = ""  # a flag takes no value: no type to show
        elif getattr(param, "multiple", False):
            param.metavar = param.name.upper()  # --hostname HOSTNAME (repeatable), not list[str]
    return params


def _usage(command: Any, ctx: Any) -> list[str]:
    """`[OPTIONS] DEVICE_ID`: arguments by name, bracketed only when optional."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            name = param.metavar + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
        else:
            pieces.extend(param.get_usage_pieces(ctx))
    return pieces


class _TidyHelp:
    """Plain metavars and reflowed paragraphs; mixed into a typer command or group class."""

    help: str | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy_params(super().get_params(ctx))  # type: ignore[misc]

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _usage(self, ctx)


class FleetpkiCommand(_TidyHelp, TyperCommand):
    """A command whose help has plain metavars and reflowed paragraphs."""


class FleetpkiGroup(_TidyHelp, TyperGroup):
    """A command group whose help has plain metavars and reflowed paragraphs."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*_usage(self, ctx), self.subcommand_metavar]


def tidy_help(app: typer.Typer) -> None:
    """Give every command and group under `app` the classes above (unless one chose its own)."""
    if not isinstance(app.info.cls, type) or app.info.cls is TyperGroup:
        app.info.cls = FleetpkiGroup
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # typer fills in TyperCommand by default
            command.cls = FleetpkiCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            tidy_help(group.typer_instance)
