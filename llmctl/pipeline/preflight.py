"""Checks made before a pipeline does any work: suite, resources, execution provider, packages.

Disk and memory needs are estimates built on the cost model's exact parameter count and
weight bytes per precision (``llmctl.cost``), so a run that cannot fit stops in a second
instead of failing an hour in.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError
from llmctl.pipeline.cache import StepCache
from llmctl.pipeline.plan import Plan, PlannedVariant

logger = logging.getLogger(__name__)

GB = 1e9
# Share of the free disk kept in reserve on top of the estimate: ONNX files carry graph
# protos and tokenizer files that the weight count does not cover.
DISK_MARGIN = 1.1
# NOTE: export peak memory is an estimate: the PyTorch model, its traced ONNX copy and the
# validation session are alive together, about three copies of the float weights.
EXPORT_WEIGHT_COPIES = 3.0
# Parity in eval keeps the reference and the candidate loaded at once.
EVAL_WEIGHT_COPIES = 2.0

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


@dataclass
class Check:
    """One pre-flight check and its outcome."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None


@dataclass
class Preflight:
    """Every check and the estimates they compared against."""

    checks: list[Check] = field(default_factory=list)
    estimates: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def raise_for_failures(self) -> None:
        """Raise one error that lists every failed check.

        Raises:
            UsageError: at least one check failed.
        """
        failed = self.failures()
        if not failed:
            return
        lines = [f"pre-flight check {check.name} failed: {check.detail}" for check in failed]
        hints = [check.hint for check in failed if check.hint]
        raise UsageError("\n".join(lines), hint="; ".join(hints) or None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "hint": c.hint} for c in self.checks],
            "estimates": self.estimates,
        }


def variant_weight_bytes(stats: Any, variant: PlannedVariant, float_dtype: str) -> int:
    """Return the cost model's weight bytes of one variant."""
    quantization = variant.quantization
    if quantization is None:
        return stats.weight_bytes(float_dtype).total
    return stats.weight_bytes(
        quantization.method,
        float_dtype=float_dtype,
        block_size=quantization.block_size,
        symmetric=quantization.symmetric,
        int8_mode=quantization.mode,
        quantize_embeddings=quantization.quantize_embeddings,
        head_bits=quantization.head_bits,
    ).total


def estimate_resources(plan: Plan, cache: StepCache) -> dict[str, Any]:
    """Estimate the disk the remaining steps write and the peak memory of the run.

    Steps already in the cache need no new disk. Returns bytes; the per-variant sizes are
    also what the dry run shows.

    Raises:
        InputError: the source's configuration cannot be read.
    """
    from llmctl.cost.model_config import load_model_config
    from llmctl.cost.model_stats import model_stats

    stats = model_stats(load_model_config(plan.source))
    float_dtype = plan.profile.recipe.dtype
    float_bytes = stats.weight_bytes(float_dtype).total
    fp32_bytes = stats.weight_bytes("fp32").total

    sizes = {variant.name: variant_weight_bytes(stats, variant, float_dtype) for variant in plan.variants}
    disk = 0
    if not cache.is_done(plan.convert):
        disk += float_bytes
        if plan.source.suffix.lower() == ".gguf":
            # The GGUF is first dequantized into a temporary fp32 checkpoint.
            disk += fp32_bytes
    for variant in plan.variants:
        if variant.build is not plan.convert and not cache.is_done(variant.build):
            disk += sizes[variant.name]

    memory = max(EXPORT_WEIGHT_COPIES * fp32_bytes, EVAL_WEIGHT_COPIES * float_bytes)
    memory += plan.profile.cost_model.runtime_overhead_gb * GB
    return {
        "parameters": stats.total_params,
        "variant_weight_bytes": sizes,
        "disk_bytes_needed": int(disk * DISK_MARGIN),
        "memory_bytes_needed": int(memory),
    }


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _gb(count: float) -> str:
    return f"{count / GB:.2f} GB"


def check_resources(estimates: dict[str, Any], out: Path) -> list[Check]:
    """Compare the estimates with the free disk under ``out`` and the available memory."""
    import psutil

    free = shutil.disk_usage(_existing_ancestor(out)).free
    needed = estimates["disk_bytes_needed"]
    estimates["disk_bytes_free"] = free
    disk = Check(
        "disk",
        free >= needed,
        f"{_gb(needed)} needed (estimate), {_gb(free)} free under {_existing_ancestor(out)}",
        None if free >= needed else "free disk space or choose another -o folder",
    )

    available = psutil.virtual_memory().available
    needed = estimates["memory_bytes_needed"]
    estimates["memory_bytes_available"] = available
    memory = Check(
        "memory",
        available >= needed,
        f"{_gb(needed)} needed at peak (estimate), {_gb(available)} available",
        None if available >= needed else "close other programs or run on a machine with more memory",
    )
    return [disk, memory]


def check_execution_provider(provider: str) -> Check:
    """Check that ONNX Runtime offers the profile's execution provider."""
    import onnxruntime

    provider_name = PROVIDER_NAMES[provider]
    available = onnxruntime.get_available_providers()
    if provider_name in available:
        return Check("execution provider", True, f"{provider_name} available")
    return Check(
        "execution provider",
        False,
        f"runtime.execution_provider {provider!r} needs {provider_name}; this onnxruntime offers {', '.join(available)}",
        "install the onnxruntime build for that provider or choose a profile for this machine",
    )


def required_packages(plan: Plan) -> dict[str, str]:
    """Return the import names the recipe needs, each with the package that provides it."""
    needed = {
        "torch": "torch",
        "transformers": "transformers",
        "onnx": "onnx",
        "onnxruntime": "onnxruntime",
        "matplotlib": "matplotlib",
    }
    exporter = plan.profile.recipe.exporter
    if exporter in ("optimum", "auto"):
        needed["optimum"] = "optimum-onnx"
    if exporter in ("genai", "auto"):
        needed["onnxruntime_genai"] = "onnxruntime-genai"
    if plan.source.suffix.lower() == ".gguf":
        needed["gguf"] = "gguf"
    return needed


def check_packages(plan: Plan) -> Check:
    """Check that every package the recipe needs can be imported."""
    missing = [package for module, package in required_packages(plan).items() if importlib.util.find_spec(module) is None]
    if not missing:
        return Check("packages", True, "all present: " + ", ".join(sorted(required_packages(plan).values())))
    return Check(
        "packages",
        False,
        "missing: " + ", ".join(missing),
        f"pip install {' '.join(missing)}",
    )


def run_preflight(plan: Plan, cache: StepCache) -> Preflight:
    """Run every resource, provider and package check for ``plan``.

    The profile and the suite were validated while the plan was built; this adds what
    depends on the machine.

    Raises:
        InputError: the source's configuration cannot be read for the estimates.
    """
    report = Preflight()
    report.estimates = estimate_resources(plan, cache)
    report.checks.extend(check_resources(report.estimates, plan.out))
    report.checks.append(check_execution_provider(plan.profile.runtime.execution_provider))
    report.checks.append(check_packages(plan))
    for check in report.checks:
        logger.info("pre-flight %s: %s", check.name, check.detail)
    return report
