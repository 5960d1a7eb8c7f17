"""Result objects and parity checks shared by convert and quantize."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.artifacts import Manifest
from llmctl.errors import ParityError

# Bytes per element of the safetensors dtypes, for counting a checkpoint's parameters.
SAFETENSORS_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ArtifactResult:
    """What a convert or quantize step wrote.

    Attributes:
        path: the artifact folder.
        manifest: its ``llmctl.json`` contents.
        summary: JSON-ready facts: sizes, parity, durations and status.
    """

    path: Path
    manifest: Manifest
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.manifest.status


class ConvertResult(ArtifactResult):
    """The result of ``llmctl.convert.convert``."""


class QuantizeResult(ArtifactResult):
    """The result of ``llmctl.quantize.quantize``."""


def artifact_status(parity: dict[str, Any] | None) -> str:
    """Return the manifest status: ok, parity-failed, or not-validated when parity did not run."""
    if parity is None:
        return "not-validated"
    return "ok" if parity["passed"] else "parity-failed"


def parity_error(step: str, out: Path, parity: dict[str, Any], tolerance_field: str) -> ParityError:
    """Build the error for a step whose parity breached the profile's tolerance."""
    return ParityError(
        f"{step} of {out}: parity check failed: " + "; ".join(parity["failures"]),
        parity=parity,
        hint=f"pass --keep-failed to keep the artifact marked as failed, or loosen recipe.{tolerance_field} in the profile",
    )


def checkpoint_fp32_bytes(folder: Path) -> int:
    """Return the fp32 size of the parameters stored in a folder's safetensors files (tied weights once)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            if entry["dtype"] in ("F64", "F32", "F16", "BF16"):
                total += 4 * count
    return total
