"""ONNX Runtime GenAI backend: the fast path for artifacts with a ``genai_config.json``.

Two ways to generate, chosen when the backend loads:

- continuous batching (the server's default): every request goes to one ``BatchEngine``
  (``llmctl.runtime.batching``) that runs the artifact's decoder file through onnxruntime
  with one shared in-place KV cache, so concurrent requests share each decode step. The
  GenAI model builder's graphs support that; sampling happens in numpy;
- per-request ``og.Generator`` loops (the CLI, and graphs the engine cannot run): GenAI's
  own sampler for plain sampling parameters, and a loop that reads the logits and samples
  in numpy for requests that need logit bias, penalties or log-probabilities, which GenAI
  0.12.2 does not offer natively. Concurrent generators take turns on one step lock.

``og.Engine`` is not used: see the note in ``llmctl.runtime.batching``. GenAI hands back
only the last position's logits, so ``score`` runs the decoder file through onnxruntime too
(the batching engine's session when there is one).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import RuntimeBackendError, UnsupportedError
from llmctl.runtime.base import Capabilities, GenerationStep, SamplingParams
from llmctl.runtime.batching import TurnLock, can_batch
from llmctl.runtime.common import ScoringBackend
from llmctl.runtime.ort import OnnxDecoder, find_decoder_file
from llmctl.runtime.tokenizer import read_json

logger = logging.getLogger(__name__)

GENAI_PROVIDERS = {"cuda": "cuda", "dml": "dml", "tensorrt": "NvTensorRtRtx", "coreml": "coreml"}
# The providers whose presence onnxruntime_genai can report before a load fails on them.
GENAI_PROVIDER_CHECKS = {"cuda": "is_cuda_available", "tensorrt": "is_cuda_available", "dml": "is_dml_available"}


class GenAIBackend(ScoringBackend):
    """Runs a GenAI model builder artifact with onnxruntime_genai.

    Options:
        execution_provider: the profile's provider name; default cpu.
        continuous_batching: run generations through the batching engine; default True.
            Only the CPU provider has it: the engine binds its cache in host memory.
    """

    name = "genai"

    def __init__(self, model_path: Path, *, threads: int = 0, **options: Any) -> None:
        super().__init__(model_path, threads=threads, **options)
        self.batching = bool(options.get("continuous_batching", True))
        self.provider = str(options.get("execution_provider", "cpu"))
        self.capabilities = Capabilities(logprobs=True, prompt_logprobs=True, logit_bias=True, penalties=True, json_schema=True)
        self.model: Any = None
        self._og: Any = None
        # Serializes model calls: GenAI documents no thread-safety for Generator.
        self._lock = TurnLock()
        self._model_lock = threading.Lock()
        self._decoder: OnnxDecoder | None = None
        self._decoder_lock = threading.Lock()

    @classmethod
    def can_load(cls, model_path: Path) -> bool:
        return (Path(model_path) / "genai_config.json").is_file()

    def load(self) -> None:
        import onnxruntime_genai as og

        if not self.can_load(self.model_path):
            raise RuntimeBackendError(
                f"{self.model_path} has no genai_config.json",
                hint="convert with --exporter genai, or use --backend ort",
            )
        check_genai_provider(og, self.provider)
        self._og = og
        self._load_tokenizer()

        genai_model = read_json(self.model_path / "genai_config.json").get("model", {})
        self._context_length = int(genai_model.get("context_length") or self._context_length)
        genai_eos = genai_model.get("eos_token_id")
        if isinstance(genai_eos, int):
            genai_eos = [genai_eos]
        self._eos_ids = sorted(set(self._eos_ids) | {int(e) for e in genai_eos or []})

        decoder_file = find_decoder_file(self.model_path)
        if self.batching and can_batch(decoder_file, self.provider):
            logger.info("loading %s with onnxruntime for continuous batching", decoder_file)
            self._decoder = OnnxDecoder(decoder_file, threads=self.threads, execution_provider=self.provider)
            self._start_batching(self._decoder, self._lock)
        else:
            self._genai_model()

    def _genai_model(self) -> Any:
        """Return the ``og.Model``, loading it on first use."""
        with self._model_lock:
            if self.model is None:
                if self._og is None:
                    raise RuntimeBackendError(f"the genai backend for {self.model_path} is not loaded", hint="call load() first")
                self.model = self._load_genai_model()
            return self.model

    def _load_genai_model(self) -> Any:
        og = self._og
        logger.info("loading %s with onnxruntime_genai %s", self.model_path, og.__version__)
        try:
            config = og.Config(str(self.model_path))
            config.clear_providers()
            if self.provider != "cpu":
                config.append_provider(GENAI_PROVIDERS.get(self.provider, self.provider))
            if self.threads:
                overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}}
                config.overlay(json.dumps(overlay))
            return og.Model(config)
        except RuntimeError as error:  # GenAI raises RuntimeError (OrtException) for every load failure
            raise RuntimeBackendError(f"onnxruntime_genai cannot load {self.model_path}: {error}", hint="re-run llmctl convert") from error

    def close(self) -> None:
        self._stop_batching()
        self._decoder = None
        self.model = None

    # Generation

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[GenerationStep]:
        ids, budget = self._prepare_prompt(prompt_ids, params)
        if self._engine is not None:
            return self._generate_batched(ids, budget, params)
        if params.needs_logits():
            return self._generate_with_sampler(ids, budget, params)
        return self._generate_native(ids, budget, params)

    def _generator_params(self, prompt_length: int, budget: int, params: SamplingParams, *, native: bool) -> Any:
        og_params = self._og.GeneratorParams(self._genai_model())
        options: dict[str, Any] = {"max_length": prompt_length + budget, "do_sample": False, "num_beams": 1}
        if native:
            if params.temperature > 0:
                options.update(
                    do_sample=True,
                    temperature=float(params.temperature),
                    top_p=float(params.top_p),
                    # GenAI's own default top_k is 50; 0 in the OpenAI sense means no limit.
                    top_k=min(int(params.top_k), self.vocab_size) if params.top_k > 0 else self.vocab_size,
                    # GenAI takes a 32-bit signed seed; folding keeps "same seed, same output".
                    random_seed=int(params.seed) % 2**31 if params.seed is not None else secrets.randbelow(2**31),
                )
            if params.ignore_eos:
                options["min_length"] = prompt_length + budget
        og_params.set_search_options(**options)
        return og_params

    def _finish_reason(self, token: int, count: int, budget: int, done: bool, params: SamplingParams) -> str | None:
        if token in self._eos_ids and not params.ignore_eos:
            return "stop"
        if count >= budget:
            return "length"
        if done:
            return "stop"
        return None

    def _generate_native(self, ids: list[int], budget: int, params: SamplingParams) -> Iterator[GenerationStep]:
        if budget == 0:
            return
        with self._lock:
            generator = self._og.Generator(self._genai_model(), self._generator_params(len(ids), budget, params, native=True))
            generator.append_tokens(np.asarray(ids, dtype=np.int32))
        try:
            for count in range(1, budget + 1):
                with self._lock:
                    generator.generate_next_token()
                    token = int(generator.get_next_tokens()[0])
                    done = generator.is_done()
                finish = self._finish_reason(token, count, budget, done, params)
                yield GenerationStep(token, None, finish)
                if finish:
                    return
        finally:
            del generator

    def _generate_with_sampler(self, ids: list[int], budget: int, params: SamplingParams) -> Iterator[GenerationStep]:
        if budget == 0:
            return
        sampler = self.make_sampler(params)
        with self._lock:
            generator = self._og.Generator(self._genai_model(), self._generator_params(len(ids), budget, params, native=False))
            generator.append_tokens(np.asarray(ids, dtype=np.int32))
        try:
            for count in range(1, budget + 1):
                with self._lock:
                    logits = generator.get_logits()[0, -1]
                token, logprob = sampler.step(logits)
                finish = self._finish_reason(token, count, budget, False, params)
                yield GenerationStep(token, logprob, finish)
                if finish:
                    return
                with self._lock:
                    generator.append_tokens(np.asarray([token], dtype=np.int32))
        finally:
            del generator

    # Scoring goes through onnxruntime on the same decoder file.

    def _batch_logits(self, sequences: list[list[int]]) -> np.ndarray:
        return self._score_decoder().batch_logits(sequences, self.tokenizer.pad_token_id or 0)

    def _score_decoder(self) -> OnnxDecoder:
        with self._decoder_lock:
            if self._decoder is None:
                # NOTE: beside a loaded og.Model, this session keeps a second copy of the weights.
                self._decoder = OnnxDecoder(
                    find_decoder_file(self.model_path), threads=self.threads, execution_provider=self.provider
                )
            return self._decoder


def check_genai_provider(og: Any, provider: str) -> None:
    """Reject a profile's execution provider that this onnxruntime_genai build lacks.

    Raises:
        UnsupportedError: the build reports that it cannot use ``provider``.
    """
    check = getattr(og, GENAI_PROVIDER_CHECKS.get(provider, ""), None)
    if check is None or check():
        return
    raise UnsupportedError(
        f"the profile's execution provider {provider!r} is not available in this onnxruntime-genai build",
        hint=f"use a CPU profile such as --profile cpu-x86-avx2, or install the onnxruntime-genai build for {provider}",
    )
