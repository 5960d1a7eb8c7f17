"""``llmctl profiles``: list, show, validate and detect hardware profiles."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from llmctl.cli.options import JsonOpt
from llmctl.cli.output import emit_json, print_table, stdout

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
    print_table(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(metavar="PROFILE", help="Built-in profile name or YAML file.", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
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
def validate(
    files: Annotated[list[Path], typer.Argument(metavar="FILE", help="Profile YAML files to check.", show_default=False)],
) -> None:
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
    compare_hint = "llmctl profiles show cpu-x86-avx2 prints a valid profile to compare with"
    if len(problems) == 1:
        problems[0].hint = problems[0].hint or compare_hint
        raise problems[0]
    if problems:
        raise ProfileError("\n".join(p.message for p in problems), hint=compare_hint)


@app.command("detect")
def detect(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write the profile to this YAML file instead of stdout.",
                                  show_default=False)
    ] = None,
    name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="Profile name; default detected-HOST.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing output file.")] = False,
) -> None:
    """Measure this machine (cores, memory, ISA flags, memory bandwidth, fp32 peak) and write a profile."""
    import yaml

    from llmctl.cli.output import stderr
    from llmctl.errors import OutputExistsError, UsageError
    from llmctl.profiles.detect import detect_profile

    if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise UsageError(f"--name {name!r} is not a valid profile name", hint="use lower-case letters, digits, '.', '_' or '-'")
    if output is not None and output.exists() and not force:
        raise OutputExistsError(f"{output} already exists", hint="pass --force to replace it")
    with stderr.status("measuring memory bandwidth and fp32 peak"):
        profile, measured = detect_profile(name)
    text = "# Written by llmctl profiles detect. The bandwidth and fp32 peak are measured.\n" + yaml.safe_dump(
        profile.model_dump(mode="json", exclude_none=True), sort_keys=False
    )
    if output is None:
        print(text, end="")
        return
    _write_text_atomically(output, text)
    stderr.print(
        f"wrote {output}: {profile.hardware.cores} cores, {profile.hardware.memory_gb:g} GB, "
        f"{measured.read_bandwidth_gbps:.1f} GB/s read, {measured.fp32_tflops:.3f} TFLOPS fp32",
        highlight=False,
    )


def _write_text_atomically(path: Path, text: str) -> None:
    """Write through a temporary sibling and rename it, so the file is never half-written."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
