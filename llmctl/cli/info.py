"""``llmctl info``: show an artifact's manifest and optionally re-hash its files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.cli.options import JsonOpt


def info_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder (with llmctl.json), or its llmctl.json.", show_default=False)],
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file and compare with the manifest; exit 1 on a mismatch.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what an artifact is, where it came from and how it was built."""
    from llmctl.artifacts import MANIFEST_NAME, read_manifest, verify_manifest
    from llmctl.cli.output import emit_json, human_bytes, stdout
    from llmctl.errors import ConversionError, InputError

    if not artifact.exists():
        raise InputError(f"{artifact}: path not found", hint="pass a folder written by llmctl convert or quantize")
    if artifact.is_file() and artifact.name == MANIFEST_NAME:
        artifact = artifact.parent  # the manifest file stands for its artifact folder
    manifest = read_manifest(artifact)
    problems = verify_manifest(artifact, manifest) if verify else None

    if as_json:
        data = manifest.model_dump(mode="json")
        if verify:
            data["verify"] = {"ok": not problems, "problems": problems}
        emit_json(data)
    else:
        model = manifest.model
        stdout.print(f"[bold]{artifact}[/]  status: {manifest.status}")
        stdout.print(f"source: {manifest.source.kind} {manifest.source.location}")
        stdout.print("model: " + ", ".join(f"{k}={v}" for k, v in model.items()))
        for step in manifest.steps:
            parity = step.parity or {}
            parity_text = f", max |Δlogit| {parity['max_abs_logit_diff']:.3g}, top-1 {parity['top1_agreement']:.3f}" if parity else ""
            stdout.print(f"step {step.name}: {step.component}, {step.duration_s:.1f} s{parity_text}")
        total = sum(entry.bytes for entry in manifest.files)
        stdout.print(f"files: {len(manifest.files)}, {human_bytes(total)}")
        if verify:
            stdout.print("verify: ok" if not problems else "verify: FAILED")
            for problem in problems or []:
                stdout.print(f"  {problem}")
    if problems:
        raise ConversionError(f"{artifact}: {len(problems)} file(s) do not match the manifest", hint="rebuild the artifact because it was changed after it was written")
