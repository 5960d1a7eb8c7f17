"""``llmctl quantize``: an ONNX artifact to int8 or int4."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.cli.convert import KeepFailedOpt, finish
from llmctl.cli.options import ForceOpt, JsonOpt, OutputDirOpt, ProfileOpt


def quantize_command(
    model_dir: Annotated[Path, typer.Argument(help="Artifact folder written by llmctl convert.", show_default=False)],
    output: OutputDirOpt,
    method: Annotated[str | None, typer.Option("--method", "-m", autocompletion=lambda: ["int8", "int4"], help="int8 or int4; default: the profile's recipe.", show_default=False)] = None,
    profile: ProfileOpt = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="Weights per quantization block: 16, 32, 64, 128 or 256.", show_default=False)] = None,
    accuracy_level: Annotated[
        int | None, typer.Option("--accuracy-level", help="Weight-only only: MatMulNBits compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8.", show_default=False)
    ] = None,
    symmetric: Annotated[bool | None, typer.Option("--symmetric/--asymmetric", help="Symmetric blocks (no zero points) or asymmetric.", show_default=False)] = None,
    mode: Annotated[str | None, typer.Option("--mode", autocompletion=lambda: ["weight-only", "dynamic"], help="int8 only: weight-only (MatMulNBits) or dynamic (ONNX Runtime dynamic quantization).", show_default=False)] = None,
    algorithm: Annotated[str | None, typer.Option("--algorithm", autocompletion=lambda: ["rtn", "hqq", "k_quant"], help="Weight-only quantization algorithm: rtn, hqq or k_quant.", show_default=False)] = None,
    per_channel: Annotated[bool | None, typer.Option("--per-channel/--per-tensor", help="int8 dynamic only: per-channel weight scales.", show_default=False)] = None,
    force: ForceOpt = False,
    keep_failed: KeepFailedOpt = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the parity check against the input model.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize an ONNX artifact to int8 or int4 and check it against its input."""
    from llmctl.profiles import load_profile
    from llmctl.quantize import quantize, resolve_settings

    loaded = load_profile(profile)
    # Check the options before the input, so that a typo fails fast with exit 2.
    resolve_settings(loaded, method=method, block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric, mode=mode, algorithm=algorithm, per_channel=per_channel)
    result = quantize(
        model_dir, output, profile=loaded, method=method, block_size=block_size, accuracy_level=accuracy_level,
        symmetric=symmetric, mode=mode, algorithm=algorithm, per_channel=per_channel, force=force,
        keep_failed=keep_failed, validate=not no_validate,
    )
    finish(result.summary, as_json, "quantize", "quantize_tolerance")
