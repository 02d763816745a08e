"""The `fleetpki` CLI's exit codes: one table every command uses, documented in README.md."""

from __future__ import annotations

from enum import IntEnum
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape


class ExitCode(IntEnum):
    """What a script may rely on, whichever `fleetpki` command it ran."""

    OK = 0
    """Done, or nothing to do (the command says which)."""
    FAILED = 1
    """The command ran but could not finish: an I/O error, a failed check."""
    USAGE = 2
    """Input refused, nothing changed: a bad option or value, an uninitialized home, a busy port."""
    NOT_FOUND = 3
    """The named device, batch or service identity is not registered."""
    INTERRUPTED = 130
    """Ctrl-C (128 + SIGINT, the shell's convention)."""


_err = Console(stderr=True, soft_wrap=True)


def error_exit(message: str, code: ExitCode = ExitCode.USAGE) -> typer.Exit:
    """Print `error: message` on stderr; return the Exit for the caller to raise."""
    _err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(int(code))


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    raise error_exit(message, code)
