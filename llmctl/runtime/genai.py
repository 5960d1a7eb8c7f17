"""ONNX Runtime GenAI backend: the fast path for artifacts with a ``genai_config.json``.

Three generation paths, chosen per request:

- continuous batching: requests that GenAI's own sampler can serve (temperature, top-p,
  top-k, seed) go to one ``og.Engine`` driven by a background thread, which batches the
  decode steps of concurrent requests;
- a plain ``og.Generator`` loop for the same requests when batching is turned off (the CLI);
- a ``Generator`` loop that reads the logits and samples in numpy for requests that need
  logit bias, penalties or log-probabilities, which GenAI 0.12.2 does not offer natively.

GenAI hands back only the last position's logits, so ``score`` runs the same decoder file
through onnxruntime (loaded on first use).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import secrets
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import RuntimeBackendError
from llmctl.runtime.base import Capabilities, GenerationStep, SamplingParams
from llmctl.runtime.common import ScoringBackend
from llmctl.runtime.ort import OnnxDecoder, find_decoder_file
from llmctl.runtime.sampling import Sampler
from llmctl.runtime.tokenizer import read_json

logger = logging.getLogger(__name__)

GENAI_PROVIDERS = {"cuda": "cuda", "dml": "dml", "tensorrt": "NvTensorRtRtx", "coreml": "coreml"}


class GenAIBackend(ScoringBackend):
    """Runs a GenAI model builder artifact with onnxruntime_genai.

    Options:
        execution_provider: the profile's provider name; default cpu.
        continuous_batching: route plain sampling requests through ``og.Engine``; default True.
    """

    name = "genai"

    def __init__(self, model_path: Path, *, threads: int = 0, **options: Any) -> None:
        super().__init__(model_path, threads=threads, **options)
        self.batching = bool(options.get("continuous_batching", True))
        # NOTE: GeneratorParams.set_guidance (llguidance) could constrain output to a JSON
        # schema, but it is not wired to SamplingParams yet, so json_schema stays False.
        self.capabilities = Capabilities(
            logprobs=True, prompt_logprobs=True, logit_bias=True, penalties=True, continuous_batching=self.batching
        )
        self.model: Any = None
        self._og: Any = None
        # Serializes Generator calls: GenAI documents no thread-safety for concurrent generators.
        self._lock = threading.Lock()
        self._engine: _EngineWorker | None = None
        self._engine_eos_id: int | None = None
        self._scorer: OnnxDecoder | None = None
        self._scorer_lock = threading.Lock()

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
        logger.info("loading %s with onnxruntime_genai %s", self.model_path, og.__version__)
        try:
            config = og.Config(str(self.model_path))
            config.clear_providers()
            provider = self.options.get("execution_provider", "cpu")
            if provider != "cpu":
                config.append_provider(GENAI_PROVIDERS.get(provider, provider))
            if self.threads:
                overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}}
                config.overlay(json.dumps(overlay))
            self.model = og.Model(config)
        except RuntimeError as error:  # GenAI raises RuntimeError (OrtException) for every load failure
            raise RuntimeBackendError(f"onnxruntime_genai cannot load {self.model_path}: {error}", hint="re-run llmctl convert") from error
        self._og = og
        self._load_tokenizer()

        genai_model = read_json(self.model_path / "genai_config.json").get("model", {})
        self._context_length = int(genai_model.get("context_length") or self._context_length)
        genai_eos = genai_model.get("eos_token_id")
        if isinstance(genai_eos, int):
            genai_eos = [genai_eos]
        self._eos_ids = sorted(set(self._eos_ids) | {int(e) for e in genai_eos or []})
        # The id reported for a request the engine ended on an end-of-sequence token.
        self._engine_eos_id = int(genai_eos[0]) if genai_eos else (self._eos_ids[0] if self._eos_ids else None)
        if self.batching:
            self._engine = _EngineWorker(og.Engine(self.model))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
            self._engine = None
        self._scorer = None
        self.model = None

    # Generation

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[GenerationStep]:
        ids, budget = self._prepare_prompt(prompt_ids, params)
        if params.needs_logits():
            return self._generate_with_sampler(ids, budget, params)
        if self._engine is not None:
            return self._generate_batched(ids, budget, params)
        return self._generate_native(ids, budget, params)

    def _generator_params(self, prompt_length: int, budget: int, params: SamplingParams, *, native: bool) -> Any:
        og_params = self._og.GeneratorParams(self._require_model())
        options: dict[str, Any] = {"max_length": prompt_length + budget, "do_sample": False, "num_beams": 1}
        if native:
            if params.temperature > 0:
                options.update(
                    do_sample=True,
                    temperature=float(params.temperature),
                    top_p=float(params.top_p),
                    # GenAI's own default top_k is 50; 0 in the OpenAI sense means no limit.
                    top_k=int(params.top_k) if params.top_k > 0 else self.vocab_size,
                    random_seed=int(params.seed) if params.seed is not None else secrets.randbelow(2**31),
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
            generator = self._og.Generator(self._require_model(), self._generator_params(len(ids), budget, params, native=True))
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
        sampler = Sampler(params, self.vocab_size, self._eos_ids)
        with self._lock:
            generator = self._og.Generator(self._require_model(), self._generator_params(len(ids), budget, params, native=False))
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

    def _generate_batched(self, ids: list[int], budget: int, params: SamplingParams) -> Iterator[GenerationStep]:
        if budget == 0:
            return
        engine = self._engine
        assert engine is not None
        request = self._og.Request(self._generator_params(len(ids), budget, params, native=True))
        request.add_tokens(np.asarray(ids, dtype=np.int32))
        key, tokens = engine.submit(request)
        finished = False
        count = 0
        try:
            while not finished:
                item = tokens.get()
                if isinstance(item, BaseException):
                    raise RuntimeBackendError(f"onnxruntime_genai engine failed: {item}") from item
                new_tokens, done = item
                if done and not new_tokens:
                    # The engine ended the request on an end-of-sequence token, which it does
                    # not hand out as an unseen token.
                    # NOTE: the engine does not say which end-of-sequence id it sampled, so a
                    # model with several reports the first one of genai_config.json.
                    if self._engine_eos_id is None:
                        return
                    new_tokens = [self._engine_eos_id]
                for index, token in enumerate(new_tokens):
                    count += 1
                    finish = self._finish_reason(token, count, budget, done and index == len(new_tokens) - 1, params)
                    yield GenerationStep(token, None, finish)
                    if finish:
                        finished = True
                        break
        finally:
            if not finished:
                engine.cancel(key)

    # Scoring goes through onnxruntime on the same decoder file.

    def _batch_logits(self, sequences: list[list[int]]) -> np.ndarray:
        decoder = self._score_decoder()
        width = max(len(s) for s in sequences)
        ids = np.zeros((len(sequences), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        logits, _ = decoder.run(ids, mask, decoder.empty_cache(len(sequences)))
        return logits.astype(np.float32, copy=False)

    def _score_decoder(self) -> OnnxDecoder:
        with self._scorer_lock:
            if self._scorer is None:
                # NOTE: this second session keeps another copy of the weights in memory.
                self._scorer = OnnxDecoder(
                    find_decoder_file(self.model_path),
                    threads=self.threads,
                    execution_provider=self.options.get("execution_provider", "cpu"),
                )
            return self._scorer

    def _require_model(self) -> Any:
        if self.model is None:
            raise RuntimeBackendError(f"the genai backend for {self.model_path} is not loaded", hint="call load() first")
        return self.model


class _EngineWorker:
    """Owns one ``og.Engine`` and steps it on a background thread.

    Every engine call happens on that thread; other threads only put submissions and
    cancellations on queues, so the engine is never touched concurrently. Each request's
    tokens go to its own queue as ``(tokens, done)`` items, or an exception if a step fails.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._submissions: queue.Queue = queue.Queue()
        self._cancellations: queue.Queue = queue.Queue()
        self._streams: dict[int, tuple[Any, queue.Queue]] = {}
        self._keys = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genai-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Any) -> tuple[int, queue.Queue]:
        key = next(self._keys)
        tokens: queue.Queue = queue.Queue()
        request.set_opaque_data(key)
        self._submissions.put((key, request, tokens))
        return key, tokens

    def cancel(self, key: int) -> None:
        self._cancellations.put(key)

    def stop(self) -> None:
        """Stop the thread, fail the requests still in flight and release the engine."""
        self._stopping.set()
        self._submissions.put(None)
        self._thread.join(timeout=10)
        self._engine = None

    @property
    def active_requests(self) -> int:
        """The number of requests in the engine, for tests and metrics."""
        return len(self._streams)

    def _take_submissions(self) -> None:
        block = not self._streams
        while True:
            try:
                item = self._submissions.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                continue
            key, request, tokens = item
            self._engine.add_request(request)
            self._streams[key] = (request, tokens)

    def _take_cancellations(self) -> None:
        while True:
            try:
                key = self._cancellations.get_nowait()
            except queue.Empty:
                return
            entry = self._streams.pop(key, None)
            if entry is not None:
                self._engine.remove_request(entry[0])

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._take_submissions()
                self._take_cancellations()
                if not self._streams:
                    continue
                try:
                    request = self._engine.step()
                except RuntimeError:
                    # A step whose requests all end on an end-of-sequence token has no token to
                    # hand out, and og.Engine (0.12.2) raises "Expected at least one request to
                    # be ready". Those requests are done; anything else is a real failure.
                    if not self._drain_finished():
                        raise
                    continue
                if request is None:
                    self._drain_all()
                else:
                    self._drain(request)
                # A request that ends on an end-of-sequence token in a batch with others is
                # never returned by step(), so its stream would wait forever.
                self._drain_finished()
            except Exception as error:  # a failed step fails every request in flight, not the thread
                logger.exception("GenAI engine step failed; failing %d requests", len(self._streams))
                for request, tokens in self._streams.values():
                    try:
                        self._engine.remove_request(request)
                    except Exception:  # already gone from the engine
                        logger.debug("removing a failed request", exc_info=True)
                    tokens.put(error)
                self._streams.clear()
        for request, tokens in self._streams.values():
            self._engine.remove_request(request)
            tokens.put(RuntimeBackendError("the model was unloaded during generation"))
        self._streams.clear()

    def _drain(self, request: Any) -> None:
        key = request.get_opaque_data()
        entry = self._streams.get(key)
        if entry is None:
            return
        new_tokens = []
        while request.has_unseen_tokens():
            new_tokens.append(int(request.get_unseen_token()))
        done = request.is_done()
        if new_tokens or done:
            entry[1].put((new_tokens, done))
        if done:
            self._engine.remove_request(request)
            del self._streams[key]

    def _drain_all(self) -> None:
        for key in list(self._streams):
            self._drain(self._streams[key][0])

    def _drain_finished(self) -> int:
        """Hand out and remove every request the engine finished; return how many there were."""
        finished = [request for request, _ in self._streams.values() if request.is_done()]
        for request in finished:
            self._drain(request)
        return len(finished)
