"""Where the CLI writes: results to stdout, progress, warnings and errors to stderr."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from rich.table import Table

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

# Width limit for tables written to a pipe or a file, where rich would otherwise assume 80
# columns and cut cells short. A table narrower than this keeps its natural width.
UNBOUNDED_WIDTH = 1000


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout, with no styling, for machines to read."""
    print(json.dumps(data, indent=2, default=str))


def human_bytes(count: float) -> str:
    """Format a byte count with a binary-free decimal unit (MB = 10^6 bytes), as file sizes are quoted."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table`` without cutting any cell short.

    Rich fits a table to the console by shrinking columns past their longest word and
    cutting cells with an ellipsis, and on a pipe or a file it assumes 80 columns. Here the
    first column, which names the row, never wraps. On a terminal the other columns wrap
    between words only, and a table that cannot fit even so is printed wider than the
    terminal (which then wraps its lines). Elsewhere the table keeps its natural width,
    whatever the terminal is.

    Args:
        table: the table; its first column is set to not wrap, and on a narrow terminal
            every column gets a fixed width.
        console: where to print; stdout by default.
    """
    console = console or stdout
    if table.columns:
        table.columns[0].no_wrap = True
    if not console.is_terminal:
        Console(file=console.file, width=UNBOUNDED_WIDTH, no_color=console.no_color).print(table)
        return
    width = _fit_columns(table, console)
    if width <= console.width:
        console.print(table)
        return
    # Console.print never renders wider than its console, so a wider one writes to the same file.
    wide = Console(file=console.file, width=width, force_terminal=True, no_color=console.no_color,
                   color_system=console.color_system or "auto")  # type: ignore[arg-type]
    wide.print(table)


def _fit_columns(table: Table, console: Console) -> int:
    """Give each column of ``table`` a width between its longest word and its longest cell.

    Returns:
        The table's width: at most the console's unless the longest words alone need more.
    """
    from rich.measure import Measurement

    options = console.options.update_width(UNBOUNDED_WIDTH)
    natural = Measurement.get(console, options, table).maximum
    lows, highs = [], []
    for column in table.columns:
        sizes = [Measurement.get(console, options, cell) for cell in (column.header, *column.cells)]
        highs.append(max(size.maximum for size in sizes))
        lows.append(highs[-1] if column.no_wrap else max(size.minimum for size in sizes))
    borders_and_padding = natural - sum(highs)
    if natural <= console.width:
        return natural

    spare = console.width - borders_and_padding - sum(lows)
    slack = sum(highs) - sum(lows)
    widths = list(lows)
    if spare > 0 and slack > 0:
        widths = [low + (high - low) * spare // slack for low, high in zip(lows, highs)]
    for column, column_width in zip(table.columns, widths):
        column.width = column_width
    return sum(widths) + borders_and_padding
