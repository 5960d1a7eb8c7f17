"""Option aliases shared by every command, defined once.

Flags get an empty metavar so that help shows ``--json`` and not ``--json <bool>``, which
would suggest ``--json true``; options that take a value get an upper-case placeholder
instead of a Python type name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        "-p",
        metavar="PROFILE",
        help="Built-in profile name or a profile YAML file; default: $LLMCTL_PROFILE or cpu-x86-avx2.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing output folder.")]
OutputDirOpt = Annotated[
    Path, typer.Option("--output", "-o", metavar="DIR", help="Output folder; written atomically.", show_default=False)
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        "-b",
        metavar="NAME",
        autocompletion=lambda: ["auto", "genai", "ort", "torch"],
        help="Runtime backend: auto (from the model folder), genai, ort or torch.",
    ),
]


def reject_non_finite(param: typer.CallbackParam, value: float | None) -> float | None:
    """Reject ``inf`` and ``nan``, which Typer's float type accepts, with a one-line usage error.

    Use it as the ``callback=`` of every float option (``float_option`` does that).

    Raises:
        UsageError: ``value`` is infinite or not a number.
    """
    from llmctl.errors import UsageError

    if value is not None and not math.isfinite(value):
        name = max(param.opts, key=len) if param.opts else param.name
        raise UsageError(f"{name} {value} is not a finite number", hint=f"pass a number such as 1.5 to {name}")
    return value


def float_option(*param_decls: str, **settings: Any) -> Any:
    """Return ``typer.Option(...)`` for a float that must be finite; ``settings`` pass through."""
    return typer.Option(*param_decls, callback=reject_non_finite, **settings)
