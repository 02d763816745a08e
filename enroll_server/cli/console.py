"""The CLI's standard output: rich, at the terminal's width, and whole lines when piped."""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions

# Piped into grep, a file or a spreadsheet, a serial, batch id or time cut at 80 columns (or
# at the width of whatever terminal stdin happens to be) is useless: tables get this much room
# and size themselves to their content.
PIPE_WIDTH = 10_000


class TableConsole(Console):
    """A Console whose width is the terminal's, or PIPE_WIDTH when stdout is not a terminal."""

    @property
    def size(self) -> ConsoleDimensions:
        measured = super().size
        if self.is_terminal:
            return measured
        return ConsoleDimensions(PIPE_WIDTH, measured.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


def stdout_console(**options: Any) -> Console:
    """The Console a command prints its tables and results to (stdout)."""
    return TableConsole(**options)
