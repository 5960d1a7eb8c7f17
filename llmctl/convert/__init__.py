"""``convert``: a Hugging Face checkpoint, GGUF file or hub id to a validated ONNX artifact."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from llmctl.artifacts import Manifest, Source, Step, atomic_output, check_output_path, folder_bytes, now_iso, package_versions
from llmctl.convert.exporters.base import Exporter, ExportResult
from llmctl.convert.results import ConvertResult, artifact_status, checkpoint_fp32_bytes, parity_error
from llmctl.convert.source import ResolvedSource, remove_gguf_copies, resolve_source
from llmctl.errors import UnsupportedError, UsageError

logger = logging.getLogger(__name__)

EXPORTER_CHOICES = ("auto", "optimum", "genai")

__all__ = ["ConvertResult", "check_dtype_runs", "convert", "select_exporter"]


def select_exporter(name: str, source: ResolvedSource) -> Exporter:
    """Return the exporter called ``name`` for ``source``; ``auto`` prefers the GenAI builder.

    Raises:
        UnsupportedError: no exporter (or not the requested one) handles the architecture.
        UsageError: ``name`` is not a registered exporter.
    """
    from llmctl.registry import exporters

    if name != "auto":
        exporter = exporters.create(name)
        reason = getattr(exporter, "unsupported_reason", lambda _: None)(source)
        if not reason and not exporter.supports(source):
            reason = f"architecture {source.architecture or source.model_type or '(none)'} is not supported by the {name} exporter"
        if reason:
            other = "optimum" if name == "genai" else "genai"
            raise UnsupportedError(reason, hint=f"use --exporter auto or --exporter {other}")
        return exporter

    candidates = [exporters.create("genai"), exporters.create("optimum")]
    for exporter in candidates:
        if exporter.supports(source):
            return exporter
    raise UnsupportedError(
        f"architecture {source.architecture or '(none)'} (model type {source.model_type or '(none)'}) is not supported by any exporter",
        hint=supported_hint(),
    )


def supported_hint() -> str:
    """Return a short list of what convert supports, for an unsupported-architecture error."""
    from llmctl.convert.exporters.genai import BUILDER_ARCHITECTURES

    return (
        f"convert and generate support these decoders: {', '.join(sorted(BUILDER_ARCHITECTURES))}; "
        "other decoders that optimum exports may work with --exporter optimum; "
        "encoder models (BERT and the like) convert for feature extraction only"
    )


def convert(
    source: str,
    out: Path,
    *,
    profile: Any,
    exporter: str | None = "auto",
    dtype: str | None = None,
    force: bool = False,
    keep_failed: bool = False,
    validate: bool = True,
    gguf_fallback: str = "error",
) -> ConvertResult:
    """Export SOURCE to an ONNX artifact folder and check it against the PyTorch model.

    Args:
        source: a checkpoint folder, a ``.gguf`` file or a hub id.
        out: the artifact folder to write; it appears only when the step succeeded.
        profile: the ``Profile`` whose recipe gives defaults and the parity tolerance.
        exporter: ``auto``, ``optimum`` or ``genai``; None uses the profile's recipe.
        dtype: ``fp32`` or ``fp16``; None uses the profile's recipe, except for a ``.gguf``
            SOURCE, whose quantized blocks are then kept (``llmctl.gguf.transcode``).
        force: replace an existing ``out``.
        keep_failed: keep an artifact that fails parity, with manifest status ``parity-failed``,
            and return it instead of raising.
        validate: run the parity check.
        gguf_fallback: for a kept GGUF quantization, ``error`` or ``requantize`` (a block type
            or architecture that cannot be carried exactly is quantized again to Q8_0).

    Returns:
        The artifact's path, manifest and a JSON-ready summary.

    Raises:
        InputError: SOURCE is missing, incomplete or corrupt.
        UnsupportedError: no exporter handles the architecture.
        ConversionError: the export failed.
        ParityError: the export drifted past ``profile.recipe.convert_tolerance``.
    """
    exporter_name = exporter or profile.recipe.exporter
    if exporter_name not in EXPORTER_CHOICES:
        from llmctl.registry import exporters

        if exporter_name not in exporters.names():
            raise UsageError(f"unknown exporter {exporter_name!r}", hint=f"choose one of: {', '.join(EXPORTER_CHOICES)}")
    keep_gguf = dtype is None and str(source).lower().endswith(".gguf")
    if keep_gguf:
        exporter_name = _check_gguf_transcode(Path(source), exporter_name, gguf_fallback)
        dtype = "fp32"  # the builder's float graph, whose MatMuls then take the GGUF blocks
    explicit_dtype = dtype is not None
    dtype = dtype or profile.recipe.dtype
    provider = check_dtype_runs(dtype, profile, explicit=explicit_dtype)
    out = Path(out)
    inputs = (source,) if Path(source).exists() else ()
    check_output_path(out, force, inputs)
    started_at, started = now_iso(), time.perf_counter()
    durations: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="llmctl-convert-") as scratch:
        workdir = Path(scratch)
        resolved = resolve_source(source, workdir)
        durations["resolve_s"] = round(time.perf_counter() - started, 2)
        chosen = select_exporter(exporter_name, resolved)

        with atomic_output(out, force, inputs) as staging:
            mark = time.perf_counter()
            export = chosen.export(resolved, staging, dtype=dtype, workdir=workdir, execution_provider=provider)
            if export.task != "text-generation-with-past":
                logger.warning(
                    "%s has no causal language model head, so it is exported for %s only; generate, serve and eval cannot use it",
                    resolved.architecture or resolved.model_type, export.task,
                )
            removed = remove_gguf_copies(staging)
            durations["export_s"] = round(time.perf_counter() - mark, 2)
            transcoded = None
            if keep_gguf:
                from llmctl.gguf.transcode import transcode

                mark = time.perf_counter()
                transcoded = transcode(staging, Path(source), fallback=gguf_fallback)
                durations["transcode_s"] = round(time.perf_counter() - mark, 2)

            parity = None
            if validate:
                mark = time.perf_counter()
                parity = _check_parity(resolved.folder, staging, export.task, profile, threads=profile.runtime.threads, provider=provider)
                durations["parity_s"] = round(time.perf_counter() - mark, 2)
            durations["total_s"] = round(time.perf_counter() - started, 2)

            summary = _summary(resolved, staging, chosen, export, dtype, parity, durations, removed)
            status = artifact_status(parity)
            summary["status"] = status
            step_extra = {}
            if transcoded is not None:
                from llmctl.gguf.transcode import summarize

                summary["dtype"] = "gguf"
                summary["gguf"] = summarize(transcoded)
                step_extra["gguf_tensors"] = transcoded.to_dict()["tensors"]
            manifest = Manifest(
                created_at=started_at,
                source=Source(kind=resolved.kind, location=resolved.location, weights=resolved.weights),
                model=_model_info(resolved, export, chosen.name, "gguf" if keep_gguf else dtype),
                profile=profile.model_dump(mode="json"),
                steps=[
                    Step(
                        name="convert", component=chosen.name,
                        parameters={"exporter": exporter_name, "dtype": dtype, "task": export.task, **export.details},
                        versions=package_versions(), started_at=started_at, duration_s=durations["total_s"],
                        parity=parity, summary={k: v for k, v in summary.items() if k != "parity"},
                        **step_extra,
                    )
                ],
                status=status,
            )
            if status == "parity-failed" and not keep_failed:
                raise parity_error("convert", out, parity, "convert_tolerance")
            manifest.write(staging)
            # Measured again now that llmctl.json exists, so both keys describe the final folder.
            summary["folder_bytes"] = folder_bytes(staging)
            summary["sizes"] = {**summary["sizes"], "folder_bytes": summary["folder_bytes"]}

    summary["path"] = str(out.resolve())
    return ConvertResult(path=out.resolve(), manifest=manifest, summary=summary)


def check_dtype_runs(dtype: str, profile: Any, *, explicit: bool) -> str:
    """Check that an artifact of ``dtype`` can run (and be validated) here; return the execution provider.

    The GenAI builder's fp16 graphs fail on ONNX Runtime's CPU execution provider (seen with
    onnxruntime 1.23 and 1.32: the Cast nodes it inserts around fp16 ops break its buffer
    reuse), and so would the parity check and ``generate``. fp16 therefore needs a GPU
    provider that this onnxruntime build offers.

    Raises:
        UsageError: fp16 with the CPU provider, or a GPU provider this onnxruntime lacks.
    """
    provider = profile.runtime.execution_provider
    if dtype != "fp16":
        return "cpu"
    source = "--dtype fp16" if explicit else f"profile {profile.name!r} (recipe.dtype fp16)"
    if provider == "cpu":
        raise UsageError(
            f"{source}: fp16 ONNX models do not run on the CPU execution provider",
            hint="use --dtype fp32, or a GPU profile on a machine with CUDA",
        )

    import onnxruntime

    from llmctl.pipeline.preflight import PROVIDER_NAMES

    available = onnxruntime.get_available_providers()
    if PROVIDER_NAMES[provider] not in available:
        raise UsageError(
            f"{'--dtype fp16' if explicit else 'recipe.dtype fp16'}: profile {profile.name!r} targets "
            f"{PROVIDER_NAMES[provider]}, and this onnxruntime offers only {', '.join(available)}",
            hint="pass --dtype fp32 to build a CPU artifact, or choose a CPU profile such as cpu-x86-avx2",
        )
    return provider


def _check_gguf_transcode(path: Path, exporter_name: str, fallback: str) -> str:
    """Check that a GGUF file's blocks can be kept, before any export work; return the exporter.

    Raises:
        UsageError: an exporter other than the GenAI builder was requested.
        UnsupportedError: an architecture or block type that cannot be carried over.
    """
    from llmctl.gguf.transcode import check_transcodable

    if exporter_name not in ("auto", "genai"):
        raise UsageError(
            f"keeping a GGUF file's quantization needs the genai exporter, not {exporter_name!r}",
            hint="use --exporter genai, or pass --dtype fp32 to dequantize",
        )
    check_transcodable(path, fallback)
    return "genai"


def _check_parity(reference: Path, artifact: Path, task: str, profile: Any, *, threads: int, provider: str = "cpu") -> dict[str, Any]:
    from llmctl.convert import parity

    prompts = parity.sample_prompts(artifact)
    tolerance = profile.recipe.convert_tolerance
    onnx_file = parity.onnx_model_file(artifact)
    logger.info("checking parity of %s against PyTorch", onnx_file.name)
    if task != "text-generation-with-past":
        return parity.compare_encoder(reference, onnx_file, prompts, tolerance).to_dict()
    report = parity.compare(
        parity.TorchCausalLM(reference, threads=threads), parity.OnnxCausalLM(onnx_file, threads=threads, provider=provider), prompts,
        tolerance=tolerance, reference_name="pytorch-fp32", candidate_name=onnx_file.name,
    )
    return report.to_dict()


def _model_info(resolved: ResolvedSource, export: ExportResult, exporter: str, dtype: str) -> dict[str, Any]:
    config = resolved.config
    text_config = config.get("text_config", {})
    tied = config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True))
    return {
        "architecture": resolved.architecture,
        "model_type": resolved.model_type,
        "task": export.task,
        "runtime": export.runtime,
        "exporter": exporter,
        "dtype": dtype,
        "tied_embeddings": bool(tied),
        "vocab_size": config.get("vocab_size", text_config.get("vocab_size")),
        "num_hidden_layers": config.get("num_hidden_layers", text_config.get("num_hidden_layers")),
        "onnx_file": "model.onnx",
    }


def _summary(
    resolved: ResolvedSource, staging: Path, exporter: Exporter, export: ExportResult, dtype: str,
    parity: dict[str, Any] | None, durations: dict[str, float], removed: list[str],
) -> dict[str, Any]:
    from llmctl.convert.onnx_files import weight_bytes

    return {
        "step": "convert",
        "source": {"kind": resolved.kind, "location": resolved.location, "bytes": sum(w.bytes for w in resolved.weights)},
        "architecture": resolved.architecture,
        "exporter": exporter.name,
        "runtime": export.runtime,
        "task": export.task,
        "dtype": dtype,
        "sizes": {
            "onnx_weight_bytes": weight_bytes(staging),
            "onnx_buffer_bytes": weight_bytes(staging, include_buffers=True) - weight_bytes(staging),
            "checkpoint_fp32_bytes": checkpoint_fp32_bytes(resolved.folder),
            "folder_bytes": folder_bytes(staging),
        },
        "removed_source_copies": removed,
        "parity": parity,
        "durations": durations,
    }
