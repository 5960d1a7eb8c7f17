"""``llmctl profiles``: list, show, validate and detect hardware profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.cli.options import JsonOpt
from llmctl.cli.output import emit_json, stdout

app = typer.Typer(help="List, show, validate and detect hardware profiles.", no_args_is_help=True)


@app.command("list")
def list_profiles(as_json: JsonOpt = False) -> None:
    """List the built-in profiles."""
    from rich.table import Table

    from llmctl.profiles import DEFAULT_PROFILE, builtin_profile_names, load_profile

    profiles = [load_profile(name) for name in builtin_profile_names()]
    if as_json:
        emit_json([p.model_dump(mode="json") for p in profiles])
        return

    table = Table("name", "kind", "hardware", "memory", "bandwidth", "$/h", "recipe")
    for profile in profiles:
        hw = profile.hardware
        price = f"{hw.price.usd_per_hour:.3f}" if hw.price else "-"
        quant = profile.recipe.quantization
        name = profile.name + (" (default)" if profile.name == DEFAULT_PROFILE else "")
        table.add_row(
            name, hw.kind, hw.name, f"{hw.memory_gb:g} GB", f"{hw.memory_bandwidth_gbps:g} GB/s", price,
            f"{profile.recipe.exporter} {profile.recipe.dtype} -> {quant.method} b{quant.block_size}",
        )
    stdout.print(table)


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="Built-in profile name or YAML file.")], as_json: JsonOpt = False) -> None:
    """Print a profile with every default filled in."""
    import yaml

    from llmctl.profiles import load_profile

    profile = load_profile(name)
    data = profile.model_dump(mode="json")
    if as_json:
        emit_json(data)
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")


@app.command("validate")
def validate(files: Annotated[list[Path], typer.Argument(help="Profile YAML files to check.")]) -> None:
    """Check profile files against the schema; exit 2 with `file: field: message` lines on errors."""
    from llmctl.errors import ProfileError
    from llmctl.profiles import load_profile_file

    problems = []
    for path in files:
        try:
            profile = load_profile_file(path)
        except ProfileError as error:
            problems.append(error)
            continue
        stdout.print(f"{path}: ok ({profile.name})", highlight=False)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ProfileError("\n".join(p.message for p in problems))
