"""The ONNX Runtime GenAI model builder as an exporter: fused decoder graphs the GenAI runtime runs."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from llmctl.convert.exporters.base import ExportResult, Exporter, copy_side_files
from llmctl.convert.source import ResolvedSource
from llmctl.errors import ConversionError, UnsupportedError

logger = logging.getLogger(__name__)

# The architectures that onnxruntime_genai.models.builder.create_model dispatches on in
# onnxruntime-genai 0.12.2, limited to text decoders (the vision-language ones export only their
# text part and need embeddings from elsewhere).
BUILDER_ARCHITECTURES = (
    "ChatGLMForConditionalGeneration", "ChatGLMModel", "Ernie4_5_ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GptOssForCausalLM", "GraniteForCausalLM",
    "InternLM2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "NemotronForCausalLM",
    "OlmoForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "Phi3SmallForCausalLM",
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM",
)
PRECISIONS = {"fp32": "fp32", "fp16": "fp16"}


class GenAIBuilderExporter(Exporter):
    """Exports with ``onnxruntime_genai.models.builder`` at fp32 or fp16.

    The builder writes ``model.onnx`` with every weight in ``model.onnx.data``, a
    ``genai_config.json`` and the tokenizer. With tied embeddings it stores the matrix once, as
    the output head's weight, and feeds the embedding lookup through a Transpose of it.
    """

    name = "genai"

    def supported_architectures(self) -> list[str]:
        return sorted(BUILDER_ARCHITECTURES)

    def supports(self, source: ResolvedSource) -> bool:
        return self.unsupported_reason(source) is None

    def unsupported_reason(self, source: ResolvedSource) -> str | None:
        """Return why the builder cannot export ``source`` correctly, or None when it can."""
        if source.architecture not in BUILDER_ARCHITECTURES:
            return f"architecture {source.architecture or '(none)'} is not supported by the GenAI model builder"
        layer_types = source.config.get("layer_types")
        if source.architecture == "Gemma3ForCausalLM" and layer_types:
            # The 0.12.2 builder hard-codes Gemma 3's pattern of five sliding-window layers
            # then one global layer, and ignores the config's layer_types.
            expected = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(len(layer_types))]
            if list(layer_types) != expected:
                return "the GenAI model builder supports Gemma 3 only with five sliding-window layers per global layer"
        return None

    def export(self, source: ResolvedSource, out_dir: Path, *, dtype: str, workdir: Path, execution_provider: str = "cpu") -> ExportResult:
        reason = self.unsupported_reason(source)
        if reason:
            raise UnsupportedError(reason, hint=f"use --exporter optimum; the builder supports: {', '.join(self.supported_architectures())}")
        if dtype not in PRECISIONS:
            raise UnsupportedError(f"dtype {dtype} is not supported by the GenAI exporter", hint="choose fp32 or fp16")

        from onnxruntime_genai.models.builder import create_model

        # NOTE: only fp16 targets the profile's GPU provider; the cuda path is not covered by
        # the test suite, which runs on CPUs.
        builder_provider = execution_provider if dtype == "fp16" else "cpu"
        cache_dir = workdir / "genai-builder-cache"
        captured = io.StringIO()
        logger.info("exporting %s with the GenAI model builder (%s)", source.architecture, dtype)
        # The builder reports progress with print() and tqdm; keep it out of stdout.
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                create_model(None, str(source.folder), str(out_dir), PRECISIONS[dtype], builder_provider, str(cache_dir))
        except (NotImplementedError, ValueError, KeyError, AttributeError, RuntimeError, OSError) as error:
            logger.debug("GenAI builder output:\n%s", captured.getvalue())
            raise ConversionError(
                f"the GenAI model builder failed on {source.architecture}: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                hint="retry with --exporter optimum, or -v for the builder's log",
            ) from error
        logger.debug("GenAI builder output:\n%s", captured.getvalue())

        copy_side_files(source.folder, out_dir)
        return ExportResult(runtime="genai", task="text-generation-with-past", details={"precision": PRECISIONS[dtype], "execution_provider": builder_provider})
