"""``llmctl convert``: a checkpoint folder, GGUF file or hub id to a validated ONNX artifact."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llmctl.cli.options import ForceOpt, JsonOpt, OutputDirOpt, ProfileOpt

KeepFailedOpt = Annotated[
    bool, typer.Option("--keep-failed", help="Keep an artifact that fails the parity check, marked parity-failed (exit 1).")
]


def render_summary(summary: dict[str, Any]) -> None:
    """Print a convert or quantize summary as a short table on stdout."""
    from rich.table import Table

    from llmctl.cli.output import human_bytes, stdout

    table = Table(show_header=False, box=None)
    table.add_row("artifact", summary.get("path", ""))
    table.add_row("status", summary.get("status", ""))
    for key, value in summary.get("sizes", {}).items():
        table.add_row(key.replace("_", " "), human_bytes(value) if key.endswith("bytes") else str(value))
    for key in ("exporter", "runtime", "dtype", "head", "embedding"):
        if key in summary:
            table.add_row(key, str(summary[key]))
    gguf = summary.get("gguf")
    if gguf:
        counts = ", ".join(f"{count} {became}" for became, count in gguf["counts"].items())
        requantized = f"; requantized to Q8_0: {', '.join(gguf['requantized'])}" if gguf["requantized"] else ""
        table.add_row("gguf tensors", counts + requantized)
    parity = summary.get("parity")
    if parity:
        table.add_row(
            "parity",
            f"max |Δlogit| {parity['max_abs_logit_diff']:.3g}, top-1 {parity['top1_agreement']:.3f}, "
            f"greedy {parity['greedy_agreement']:.3f}",
        )
    durations = summary.get("durations", {})
    table.add_row("time", ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in durations.items()))
    stdout.print(table)


def convert_command(
    source: Annotated[str, typer.Argument(help="Hugging Face checkpoint folder, .gguf file or hub id.", show_default=False)],
    output: OutputDirOpt,
    profile: ProfileOpt = None,
    exporter: Annotated[
        str | None, typer.Option("--exporter", "-e", autocompletion=lambda: ["auto", "optimum", "genai"], help="auto, optimum or genai; default: the profile's recipe.", show_default=False)
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", autocompletion=lambda: ["fp32", "fp16"], help="fp32 or fp16; default: the profile's recipe.", show_default=False)
    ] = None,
    force: ForceOpt = False,
    keep_failed: KeepFailedOpt = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the parity check against PyTorch.")] = False,
    gguf_fallback: Annotated[
        str,
        typer.Option(
            "--gguf-fallback",
            help="For a .gguf SOURCE without --dtype: error rejects a block type or architecture whose "
            "quantization cannot be kept exactly; requantize quantizes those weights again to Q8_0.",
        ),
    ] = "error",
    as_json: JsonOpt = False,
) -> None:
    """Convert SOURCE to ONNX and check it against the PyTorch model."""
    from llmctl.convert import EXPORTER_CHOICES, convert
    from llmctl.errors import UsageError
    from llmctl.profiles import load_profile

    if exporter is not None and exporter not in EXPORTER_CHOICES:
        raise UsageError(f"unknown exporter {exporter!r}", hint=f"choose one of: {', '.join(EXPORTER_CHOICES)}")
    if dtype is not None and dtype not in ("fp32", "fp16"):
        raise UsageError(f"unknown dtype {dtype!r}", hint="choose fp32 or fp16")
    if gguf_fallback not in ("error", "requantize"):
        raise UsageError(f"unknown GGUF fallback {gguf_fallback!r}", hint="choose error or requantize")
    result = convert(
        source, output, profile=load_profile(profile), exporter=exporter, dtype=dtype, force=force,
        keep_failed=keep_failed, validate=not no_validate, gguf_fallback=gguf_fallback,
    )
    finish(result.summary, as_json, "convert", "convert_tolerance")


def finish(summary: dict[str, Any], as_json: bool, step: str, tolerance_field: str) -> None:
    """Print the summary, then fail with exit 1 for an artifact kept despite a parity failure."""
    from pathlib import Path

    from llmctl.cli.output import emit_json
    from llmctl.convert.results import parity_error

    if as_json:
        emit_json(summary)
    else:
        render_summary(summary)
    if summary.get("status") == "parity-failed":
        error = parity_error(step, Path(summary["path"]), summary["parity"], tolerance_field)
        error.hint = f"the artifact was kept at {summary['path']} with status parity-failed"
        raise error
