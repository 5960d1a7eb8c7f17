"""Where the CLI writes: results to stdout, progress, warnings and errors to stderr."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


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
