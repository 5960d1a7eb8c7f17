"""The optimum exporter: any architecture and task that optimum-onnx supports."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from llmctl.convert.exporters.base import ExportResult, Exporter, copy_side_files
from llmctl.convert.onnx_files import external_data_files, load_model, save_model, tie_shared_weights
from llmctl.convert.source import ResolvedSource
from llmctl.errors import ConversionError, UnsupportedError

logger = logging.getLogger(__name__)

DECODER_TASK = "text-generation-with-past"
ENCODER_TASK = "feature-extraction"


def _supported_tasks(model_type: str) -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills the task registry)
    from optimum.exporters.tasks import TasksManager

    try:
        return list(TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers"))
    except KeyError:
        return []


class OptimumExporter(Exporter):
    """Exports with ``optimum.exporters.onnx.main_export``.

    Decoders get ``text-generation-with-past`` (one graph with KV-cache inputs), everything
    else ``feature-extraction``. A tied embedding and output head are stored once afterwards,
    and the weights are always written as external data in ``model.onnx.data``.
    """

    name = "optimum"

    def supported_architectures(self) -> list[str]:
        import optimum.exporters.onnx.model_configs  # noqa: F401
        from optimum.exporters.tasks import TasksManager

        return sorted(TasksManager._SUPPORTED_MODEL_TYPE)  # noqa: SLF001  (no public listing exists)

    def supports(self, source: ResolvedSource) -> bool:
        return bool(_supported_tasks(source.model_type.replace("_", "-"))) or bool(_supported_tasks(source.model_type))

    def task_for(self, source: ResolvedSource) -> str:
        tasks = _supported_tasks(source.model_type) or _supported_tasks(source.model_type.replace("_", "-"))
        if source.architecture.endswith("ForCausalLM") and DECODER_TASK in tasks:
            return DECODER_TASK
        if ENCODER_TASK in tasks:
            return ENCODER_TASK
        if not tasks:
            raise UnsupportedError(
                f"model type {source.model_type or '(none)'} is not supported by optimum's ONNX exporter",
                hint="see `optimum-cli export onnx --help` for the supported model types",
            )
        return tasks[0]

    def export(self, source: ResolvedSource, out_dir: Path, *, dtype: str, workdir: Path, execution_provider: str = "cpu") -> ExportResult:
        task = self.task_for(source)
        if dtype not in ("fp32", "fp16"):
            raise UnsupportedError(f"dtype {dtype} is not supported by the optimum exporter", hint="choose fp32 or fp16")
        if dtype == "fp16":
            # optimum-onnx exports fp16 only on a CUDA device.
            raise UnsupportedError(
                "the optimum exporter writes fp16 only on a GPU", hint="use --dtype fp32, or --exporter genai with a CUDA profile"
            )

        from optimum.exporters.onnx import main_export

        logger.info("exporting %s with optimum (%s)", source.model_type, task)
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                main_export(
                    str(source.folder), output=out_dir, task=task, device="cpu", do_validation=False,
                    local_files_only=True, library_name="transformers", cache_dir=str(workdir / "optimum-cache"),
                )
        except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as error:
            logger.debug("optimum output:\n%s", captured.getvalue())
            raise ConversionError(
                f"optimum export of {source.model_type} failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                hint="retry with -v for optimum's log",
            ) from error
        logger.debug("optimum output:\n%s", captured.getvalue())

        details = {"task": task, "tied_duplicates_removed": []}
        for graph_file in sorted(out_dir.glob("*.onnx")):
            stale_data = external_data_files(graph_file)
            model = load_model(graph_file)
            details["tied_duplicates_removed"] += tie_shared_weights(model)
            for stale in stale_data:
                stale.unlink(missing_ok=True)
            save_model(model, graph_file)
        copy_side_files(source.folder, out_dir)
        return ExportResult(runtime="ort", task=task, details=details)
