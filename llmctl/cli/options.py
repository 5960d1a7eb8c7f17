"""Option aliases shared by every command, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        "-p",
        help="Built-in profile name or a profile YAML file; default: $LLMCTL_PROFILE or cpu-x86-avx2.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
OutputDirOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Output folder; written atomically.", show_default=False)
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        "-b",
        help="Runtime backend: auto (from the model folder), genai, ort or torch.",
    ),
]
