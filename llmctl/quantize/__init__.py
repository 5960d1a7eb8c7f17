"""``quantize``: an ONNX artifact to an int8 or int4 artifact, checked against its input."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from llmctl.artifacts import MANIFEST_NAME, Manifest, Source, Step, atomic_output, check_output_path, folder_bytes, now_iso, package_versions, read_manifest
from llmctl.convert.results import QuantizeResult, artifact_status, parity_error
from llmctl.errors import InputError, UsageError

logger = logging.getLogger(__name__)

METHODS = ("int8", "int4")
MODES = ("dynamic", "weight-only")
ALGORITHMS = ("rtn", "hqq", "k_quant")
# MatMulNBits and GatherBlockQuantized in onnxruntime 1.23 take these block sizes only.
BLOCK_SIZES = (16, 32, 64, 128, 256)
# Operators that only a quantized graph contains.
QUANTIZED_OPS = (
    "MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
    "DequantizeLinear", "MatMulIntegerToFloat",
)

__all__ = ["QuantizeResult", "quantize", "resolve_settings"]


def resolve_settings(profile: Any, *, method=None, block_size=None, accuracy_level=None, symmetric=None, mode=None, algorithm=None, per_channel=None):
    """Merge explicit options over ``profile.recipe.quantization`` and check them.

    Values left None come from the profile. An explicit option that the chosen method and
    mode would ignore is an error, so that the manifest never records a setting that did
    not take effect.

    Raises:
        UsageError: an unknown method, mode or algorithm, a block size that is not one of
            16, 32, 64, 128 or 256, an accuracy level outside 0..4, or an explicit option
            that does not apply to the chosen method and mode.
    """
    from llmctl.quantize.methods import QuantizeSettings

    defaults = profile.recipe.quantization
    method = method or defaults.method
    if method not in METHODS:
        raise UsageError(f"unknown quantization method {method!r}", hint=f"choose one of: {', '.join(METHODS)}")
    _check_applicable(method, mode or defaults.mode, accuracy_level=accuracy_level, algorithm=algorithm, per_channel=per_channel)
    block_size = defaults.block_size if block_size is None else block_size
    if block_size not in BLOCK_SIZES:
        kind = "a power of two in 16..256" if block_size & (block_size - 1) else "in 16..256"
        raise UsageError(
            f"block size {block_size} is not {kind}",
            hint="use 16, 32, 64, 128 or 256 (the block sizes ONNX Runtime's MatMulNBits supports)",
        )
    accuracy_level = defaults.accuracy_level if accuracy_level is None else accuracy_level
    if not 0 <= accuracy_level <= 4:
        raise UsageError(f"accuracy level {accuracy_level} is outside 0..4", hint="4 computes in int8 on CPUs, 0 lets the runtime choose")
    mode = mode or defaults.mode
    if mode not in MODES:
        raise UsageError(f"unknown int8 mode {mode!r}", hint=f"choose one of: {', '.join(MODES)}")
    if method == "int4" and mode == "dynamic":
        raise UsageError("dynamic quantization is 8-bit only", hint="use --mode weight-only with int4, or --method int8")
    algorithm = algorithm or defaults.algorithm
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {algorithm!r}", hint=f"choose one of: {', '.join(ALGORITHMS)}")
    return QuantizeSettings(
        method=method, mode=mode, block_size=block_size, accuracy_level=accuracy_level, algorithm=algorithm,
        symmetric=defaults.symmetric if symmetric is None else symmetric,
        per_channel=defaults.per_channel if per_channel is None else per_channel,
        quantize_embeddings=defaults.quantize_embeddings, head_bits=defaults.head_bits,
    )


def _check_applicable(method: str, mode: str, *, accuracy_level, algorithm, per_channel) -> None:
    """Reject explicit options that the chosen method and mode would ignore."""
    dynamic = method == "int8" and mode == "dynamic"
    if per_channel is not None and not dynamic:
        raise UsageError(
            f"--per-channel/--per-tensor applies to int8 dynamic quantization only, not {method} {mode}",
            hint="drop the option, or use --method int8 --mode dynamic",
        )
    if dynamic:
        for option, value in (("--accuracy-level", accuracy_level), ("--algorithm", algorithm)):
            if value is not None:
                raise UsageError(
                    f"{option} applies to weight-only quantization (MatMulNBits), not int8 dynamic",
                    hint="drop the option, or use --mode weight-only",
                )


def already_quantized(model_dir: Path, onnx_file: Path) -> str | None:
    """Describe how the artifact in ``model_dir`` is already quantized, or return None for a float one.

    The manifest's steps and model entry say it for an artifact llmctl wrote. The graph's
    operators say it for any other folder.
    """
    if (model_dir / MANIFEST_NAME).is_file():
        manifest = read_manifest(model_dir)
        for step in reversed(manifest.steps):
            if step.name == "quantize":
                parameters = step.parameters
                described = " ".join(str(parameters[k]) for k in ("method", "mode") if parameters.get(k))
                source = step.summary.get("input") if isinstance(step.summary, dict) else None
                return f"{described or 'quantized'}" + (f", made from {source}" if source else "")
        if manifest.model.get("dtype") == "gguf":
            return "GGUF blocks kept by convert"

    from llmctl.convert.onnx_files import load_model

    graph = load_model(onnx_file, load_external_data=False).graph
    found = sorted({node.op_type for node in graph.node if node.op_type in QUANTIZED_OPS})
    if found:
        return f"its graph contains {', '.join(found)}"
    return None


def quantize(
    model_dir: Path,
    out: Path,
    *,
    profile: Any,
    method: str | None = None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    symmetric: bool | None = None,
    mode: str | None = None,
    algorithm: str | None = None,
    per_channel: bool | None = None,
    force: bool = False,
    keep_failed: bool = False,
    validate: bool = True,
) -> QuantizeResult:
    """Quantize the ONNX artifact in ``model_dir`` into ``out`` and check parity against it.

    Args:
        model_dir: an artifact folder written by ``convert`` (or any folder with ``model.onnx``).
        out: the artifact folder to write; it appears only when the step succeeded.
        profile: the ``Profile`` whose ``recipe.quantization`` gives every default left None.
        method: ``int8`` or ``int4``.
        block_size: weights per quantization block, a power of two >= 16.
        accuracy_level: MatMulNBits compute type (0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8).
        symmetric: symmetric blocks (no zero points) or asymmetric.
        mode: int8 only: ``weight-only`` (8-bit MatMulNBits) or ``dynamic`` (ONNX Runtime dynamic quantization).
        algorithm: ``rtn``, ``hqq`` or ``k_quant``.
        per_channel: int8 dynamic only: per-channel weight scales.
        force: replace an existing ``out``.
        keep_failed: keep an artifact that fails parity, marked ``parity-failed``, and return it.
        validate: run the parity check against the input model.

    Returns:
        The artifact's path, manifest and a summary with sizes before and after.

    Raises:
        UsageError: an invalid option value.
        InputError: ``model_dir`` is not an ONNX artifact.
        ParityError: the quantized model drifted past ``profile.recipe.quantize_tolerance``.
    """
    settings = resolve_settings(
        profile, method=method, block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric,
        mode=mode, algorithm=algorithm, per_channel=per_channel,
    )
    model_dir = Path(model_dir)
    onnx_file = _input_model(model_dir)
    quantized = already_quantized(model_dir, onnx_file)
    if quantized:
        raise InputError(
            f"{model_dir} is already quantized ({quantized})",
            hint="quantize the fp32 or fp16 artifact that llmctl convert wrote",
        )
    check_output_path(out, force, (model_dir,))
    previous = read_manifest(model_dir) if (model_dir / MANIFEST_NAME).is_file() else None
    provider = "cpu"
    if previous is not None and previous.model.get("dtype") == "fp16":
        from llmctl.convert import check_dtype_runs

        provider = check_dtype_runs("fp16", profile, explicit=False)
    started_at, started = now_iso(), time.perf_counter()

    from llmctl.convert.onnx_files import load_model, save_model, weight_bytes
    from llmctl.registry import quantizers

    quantizer = quantizers.create(settings.method)
    with atomic_output(Path(out), force, (model_dir,)) as staging:
        logger.info("quantizing %s to %s (%s, block %d)", onnx_file, settings.method, settings.algorithm, settings.block_size)
        model, report = quantizer.quantize_model(load_model(onnx_file), settings)
        save_model(model, staging / onnx_file.name)
        del model
        _copy_side_files(model_dir, staging)
        quantize_s = round(time.perf_counter() - started, 2)

        parity = None
        if validate:
            mark = time.perf_counter()
            parity = _check_parity(onnx_file, staging / onnx_file.name, profile, provider)
            parity_s = round(time.perf_counter() - mark, 2)
        summary = {
            "step": "quantize",
            "input": str(model_dir.resolve()),
            "settings": settings.parameters(),
            "sizes": {
                "before_folder_bytes": folder_bytes(model_dir),
                "after_folder_bytes": folder_bytes(staging),
                "before_weight_bytes": weight_bytes(model_dir),
                "after_weight_bytes": weight_bytes(staging),
            },
            "quantized_nodes": report.quantized_nodes,
            "head": report.head,
            "embedding": report.embedding,
            "shared_embedding": report.shared_embedding,
            "float_tensors": report.float_tensors,
            "parity": parity,
            "durations": {"quantize_s": quantize_s, **({"parity_s": parity_s} if validate else {}), "total_s": round(time.perf_counter() - started, 2)},
        }
        status = artifact_status(parity)
        summary["status"] = status
        manifest = _next_manifest(previous, model_dir, profile, quantizer.name, settings, started_at, summary, parity, status)
        if status == "parity-failed" and not keep_failed:
            raise parity_error("quantize", Path(out), parity, "quantize_tolerance")
        manifest.write(staging)
        summary["sizes"]["after_folder_bytes"] = folder_bytes(staging)

    summary["path"] = str(Path(out).resolve())
    return QuantizeResult(path=Path(out).resolve(), manifest=manifest, summary=summary)


def _input_model(model_dir: Path) -> Path:
    if not model_dir.exists():
        raise InputError(f"{model_dir}: path not found", hint="pass a folder written by llmctl convert")
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: not a folder", hint="pass a folder written by llmctl convert")
    from llmctl.convert.parity import onnx_model_file
    from llmctl.errors import ConversionError

    try:
        return onnx_model_file(model_dir)
    except ConversionError as error:
        raise InputError(f"{model_dir}: no .onnx model in this folder", hint="run llmctl convert first") from error


def _copy_side_files(model_dir: Path, staging: Path) -> None:
    from llmctl.convert.onnx_files import EXTERNAL_DATA_SUFFIX

    for path in model_dir.iterdir():
        skip = path.suffix in (".onnx", EXTERNAL_DATA_SUFFIX) or path.name.endswith("_data") or path.name == MANIFEST_NAME
        if path.is_file() and not skip and not (staging / path.name).exists():
            shutil.copy2(path, staging / path.name)
    genai_config = staging / "genai_config.json"
    if genai_config.is_file():
        # The decoder keeps its file name; session options stay as the builder wrote them.
        config = json.loads(genai_config.read_text(encoding="utf-8"))
        decoder = config.get("model", {}).get("decoder", {})
        onnx_files = sorted(p.name for p in staging.glob("*.onnx"))
        if onnx_files and decoder.get("filename") not in onnx_files:
            decoder["filename"] = onnx_files[0]
            genai_config.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def _check_parity(reference: Path, candidate: Path, profile: Any, provider: str = "cpu") -> dict[str, Any]:
    from llmctl.convert import parity

    threads = profile.runtime.threads
    prompts = parity.sample_prompts(candidate.parent)
    report = parity.compare(
        parity.OnnxCausalLM(reference, threads=threads, provider=provider),
        parity.OnnxCausalLM(candidate, threads=threads, provider=provider),
        prompts,
        tolerance=profile.recipe.quantize_tolerance, reference_name=f"input {reference.name}", candidate_name=candidate.name,
    )
    return report.to_dict()


def _next_manifest(previous, model_dir, profile, component, settings, started_at, summary, parity, status) -> Manifest:
    from llmctl.artifacts import hash_folder

    step = Step(
        name="quantize", component=component, parameters=settings.parameters(), versions=package_versions(),
        started_at=started_at, duration_s=summary["durations"]["total_s"], parity=parity,
        summary={k: v for k, v in summary.items() if k not in ("parity",)},
    )
    if previous is None:
        previous = Manifest(created_at=started_at, source=Source(kind="artifact", location=str(model_dir.resolve()), weights=hash_folder(model_dir)))
    data = previous.model_dump()
    data["created_at"] = started_at
    data["profile"] = profile.model_dump(mode="json")
    data["status"] = status
    data["model"] = {**data.get("model", {}), "quantization": settings.method, "quantization_mode": settings.mode}
    manifest = Manifest.model_validate(data)
    manifest.steps = [*previous.steps, step]
    return manifest
