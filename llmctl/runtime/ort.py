"""ONNX Runtime backend: runs any exported causal LM with a KV cache through an InferenceSession.

It drives the decoder graph directly instead of through optimum's ``ORTModelForCausalLM``,
because the same loop then runs both optimum exports (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.N.key/value``) and the GenAI model builder's graphs
(the same names without ``position_ids``), and it hands back logits for our own sampler.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import RuntimeBackendError, UnsupportedError
from llmctl.runtime.base import Capabilities, GenerationStep, SamplingParams
from llmctl.runtime.batching import TurnLock, can_batch
from llmctl.runtime.common import LogitsBackend
from llmctl.runtime.tokenizer import read_json

logger = logging.getLogger(__name__)

PAST_PATTERN = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def find_decoder_file(folder: Path) -> Path:
    """Return the decoder ONNX file of an artifact folder.

    Raises:
        RuntimeBackendError: the folder contains no ONNX file.
    """
    genai = read_json(folder / "genai_config.json").get("model", {}).get("decoder", {})
    candidates = [genai.get("filename"), "model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx"]
    for name in candidates:
        if name and (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.onnx"))
    if not found:
        raise RuntimeBackendError(f"no .onnx file in {folder}", hint="convert the model first: llmctl convert SOURCE -o DIR")
    return found[0]


@dataclass
class DecoderCache:
    """The KV cache of one sequence: one array per ``past_key_values`` input."""

    arrays: dict[str, np.ndarray]
    length: int


class OnnxDecoder:
    """One decoder-only ONNX graph with a KV cache, run through an InferenceSession.

    ``InferenceSession.run`` is thread-safe, and all per-sequence state lives in the
    ``DecoderCache`` each caller holds, so one instance serves concurrent generations.

    Args:
        path: the ONNX file.
        threads: intra-op threads; 0 lets ONNX Runtime choose.
        execution_provider: a profile's provider name (cpu, cuda, ...).
    """

    def __init__(self, path: Path, *, threads: int = 0, execution_provider: str = "cpu") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        provider = PROVIDERS.get(execution_provider, execution_provider)
        if provider not in ort.get_available_providers():
            raise UnsupportedError(
                f"the profile's execution provider {execution_provider!r} is not available in this onnxruntime build "
                f"(available: {', '.join(ort.get_available_providers())})",
                hint="use a profile for this machine, such as --profile cpu-x86-avx2",
            )
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[provider])
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types from C++
            raise RuntimeBackendError(f"onnxruntime cannot load {path}: {error}", hint="re-run llmctl convert") from error

        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise RuntimeBackendError(f"{path} has no input_ids input", hint="export it as text-generation-with-past")
        self.input_names = set(inputs)
        self.ids_dtype = ORT_DTYPES.get(inputs["input_ids"].type, np.int64)
        self.mask_dtype = ORT_DTYPES.get(inputs["attention_mask"].type, np.int64) if "attention_mask" in inputs else None
        self.past_names = sorted(
            (name for name in inputs if PAST_PATTERN.match(name)),
            key=lambda n: (int(PAST_PATTERN.match(n).group(1)), n),  # type: ignore[union-attr]
        )
        self.past_shapes = {}
        self.past_dtypes = {}
        for name in self.past_names:
            shape = inputs[name].shape
            # [batch, kv_heads, past_length, head_dim]: the two middle-outer dims are fixed ints.
            self.past_shapes[name] = (shape[1], shape[3])
            self.past_dtypes[name] = ORT_DTYPES.get(inputs[name].type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_for_past = {name: name.replace("past_key_values", "present") for name in self.past_names}
        missing = [p for p in self.present_for_past.values() if p not in self.output_names]
        if missing:
            raise RuntimeBackendError(f"{path} has no outputs {missing[:2]} for its KV cache inputs", hint="re-export the model")

    def empty_cache(self, batch: int = 1) -> DecoderCache:
        arrays = {
            name: np.zeros((batch, heads, 0, head_dim), dtype=self.past_dtypes[name])
            for name, (heads, head_dim) in self.past_shapes.items()
        }
        return DecoderCache(arrays, 0)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: DecoderCache) -> tuple[np.ndarray, DecoderCache]:
        """Run ``input_ids`` of shape ``(batch, seq)`` after ``cache``; return logits and the new cache.

        ``attention_mask`` covers the cached tokens and the new ones, ``(batch, past + seq)``.
        """
        batch, length = input_ids.shape
        feeds: dict[str, Any] = {"input_ids": input_ids.astype(self.ids_dtype, copy=False)}
        if self.mask_dtype is not None:
            feeds["attention_mask"] = attention_mask.astype(self.mask_dtype, copy=False)
        if "position_ids" in self.input_names:
            positions = np.cumsum(attention_mask, axis=1) - 1
            feeds["position_ids"] = np.clip(positions[:, -length:], 0, None).astype(np.int64)
        feeds.update(cache.arrays)

        outputs = dict(zip(self.output_names, self.session.run(None, feeds)))
        present = {name: outputs[self.present_for_past[name]] for name in self.past_names}
        return outputs["logits"], DecoderCache(present, cache.length + length)

    def batch_logits(self, sequences: list[list[int]], pad_id: int) -> np.ndarray:
        """Return float32 ``(batch, max_len, vocab)`` logits of right-padded sequences, run without a cache."""
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        logits, _ = self.run(ids, mask, self.empty_cache(len(sequences)))
        return logits.astype(np.float32, copy=False)


class OrtBackend(LogitsBackend):
    """Runs an exported causal LM with ONNX Runtime; samples with numpy.

    Options:
        execution_provider: the profile's provider name; default cpu.
        continuous_batching: run generations through ``llmctl.runtime.batching.BatchEngine``
            when the graph updates its cache in place (the GenAI model builder's graphs) and
            the provider is the CPU; default True. Otherwise each generation runs its own loop.
    """

    name = "ort"

    def __init__(self, model_path: Path, *, threads: int = 0, **options: Any) -> None:
        super().__init__(model_path, threads=threads, **options)
        self.decoder: OnnxDecoder | None = None
        self.capabilities = Capabilities(logprobs=True, prompt_logprobs=True, logit_bias=True, penalties=True, json_schema=True)
        self._lock = TurnLock()

    @classmethod
    def can_load(cls, model_path: Path) -> bool:
        return any(Path(model_path).glob("*.onnx"))

    def load(self) -> None:
        path = find_decoder_file(self.model_path)
        logger.info("loading %s with onnxruntime", path)
        provider = self.options.get("execution_provider", "cpu")
        self.decoder = OnnxDecoder(path, threads=self.threads, execution_provider=provider)
        self._load_tokenizer()
        if self.options.get("continuous_batching", True) and can_batch(path, provider):
            self._start_batching(self.decoder, self._lock)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[GenerationStep]:
        if self._engine is None:
            return super().generate(prompt_ids, params)
        ids, budget = self._prepare_prompt(prompt_ids, params)
        return self._generate_batched(ids, budget, params)

    def _prefill(self, token_ids: list[int]) -> tuple[np.ndarray, Any]:
        decoder = self._decoder()
        ids = np.array([token_ids], dtype=np.int64)
        logits, cache = decoder.run(ids, np.ones_like(ids), decoder.empty_cache())
        return logits[0, -1], cache

    def _decode_step(self, token_id: int, position: int, cache: Any) -> tuple[np.ndarray, Any]:
        ids = np.array([[token_id]], dtype=np.int64)
        mask = np.ones((1, cache.length + 1), dtype=np.int64)
        logits, cache = self._decoder().run(ids, mask, cache)
        return logits[0, -1], cache

    def _batch_logits(self, sequences: list[list[int]]) -> np.ndarray:
        return self._decoder().batch_logits(sequences, self.tokenizer.pad_token_id or 0)

    def _decoder(self) -> OnnxDecoder:
        if self.decoder is None:
            raise RuntimeBackendError(f"the ort backend for {self.model_path} is not loaded", hint="call load() first")
        return self.decoder

    def close(self) -> None:
        self._stop_batching()
        self.decoder = None
