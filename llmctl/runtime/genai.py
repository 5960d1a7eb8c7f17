"""ONNX Runtime GenAI backend: the fast path for artifacts with a ``genai_config.json``.

Three generation paths, chosen per request:

- batching: requests that GenAI's own sampler can serve (temperature, top-p, top-k, seed)
  go to one ``og.Engine`` driven by a background thread, which batches the decode steps of
  requests that arrive while it is idle;
- a plain ``og.Generator`` loop for the same requests when batching is turned off (the CLI),
  or when the engine is busy with a batch that a new request cannot join;
- a ``Generator`` loop that reads the logits and samples in numpy for requests that need
  logit bias, penalties or log-probabilities, which GenAI 0.12.2 does not offer natively.

GenAI hands back only the last position's logits, so ``score`` runs the same decoder file
through onnxruntime (loaded on first use).

On CPU, ``og.Engine`` in onnxruntime-genai 0.12.2 schedules requests in static batches of at
most four: a request added while a batch runs waits until that whole batch has finished, and
``remove_request`` does not stop a request that is already in a batch. So the engine only
takes requests while it is idle, a busy engine sends new requests to their own generators,
and a batch whose readers have all gone is dropped with its engine. Every engine step and
generator step takes turns on one lock, so concurrent requests progress together.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import RuntimeBackendError, UnsupportedError
from llmctl.runtime.base import Capabilities, GenerationStep, SamplingParams
from llmctl.runtime.common import ScoringBackend
from llmctl.runtime.ort import OnnxDecoder, find_decoder_file
from llmctl.runtime.sampling import Sampler
from llmctl.runtime.tokenizer import read_json

logger = logging.getLogger(__name__)

GENAI_PROVIDERS = {"cuda": "cuda", "dml": "dml", "tensorrt": "NvTensorRtRtx", "coreml": "coreml"}
# The providers whose presence onnxruntime_genai can report before a load fails on them.
GENAI_PROVIDER_CHECKS = {"cuda": "is_cuda_available", "tensorrt": "is_cuda_available", "dml": "is_dml_available"}
# NOTE: the largest static batch og.Engine (0.12.2) forms; it is a constant in its scheduler,
# not a setting, and a batch past it would wait for the first four to finish.
ENGINE_BATCH_SIZE = 4


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
        # Serializes Generator and Engine calls: GenAI documents no thread-safety for them.
        self._lock = _TurnLock()
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
        provider = self.options.get("execution_provider", "cpu")
        check_genai_provider(og, provider)
        try:
            config = og.Config(str(self.model_path))
            config.clear_providers()
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
            model = self.model
            self._engine = _EngineWorker(lambda: og.Engine(model), self._lock)

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
        submitted = engine.try_submit(request)
        if submitted is None:
            # The engine is running a batch that this request cannot join.
            yield from self._generate_native(ids, budget, params)
            return

        key, tokens = submitted
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


class _TurnLock:
    """A lock handed to waiting threads in arrival order.

    Each generation loops "take the lock, run one step, release"; with a plain lock the
    releasing thread usually takes it straight back, so one request would starve the others.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._held = False

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # the releasing thread hands the lock over before it sets the event

    def __exit__(self, *exc_info: object) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False


class _EngineWorker:
    """Owns one ``og.Engine`` and steps it on a background thread, one static batch at a time.

    Every engine call happens on that thread, under the backend's step lock. Other threads
    only add requests to the next batch (while the engine is idle) and cancel them. Each
    request's tokens go to its own queue as ``(tokens, done)`` items, or an exception if a
    step fails.

    Args:
        create_engine: builds a fresh ``og.Engine`` on the loaded model.
        step_lock: the lock every engine and generator step takes.
    """

    def __init__(self, create_engine: Callable[[], Any], step_lock: _TurnLock) -> None:
        self._create_engine = create_engine
        self._engine = create_engine()
        self._step_lock = step_lock
        self._condition = threading.Condition()
        # Guarded by _condition: requests waiting for the next batch, cancelled keys, and
        # whether the engine takes new requests (it does only between batches).
        self._pending: list[tuple[int, Any, queue.Queue]] = []
        self._cancelled: set[int] = set()
        self._accepting = True
        self._stopping = False
        # Owned by the worker thread.
        self._streams: dict[int, tuple[Any, queue.Queue]] = {}
        self._abandoned = False
        self._keys = itertools.count()
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="genai-engine", daemon=True)
        self._thread.start()

    def try_submit(self, request: Any) -> tuple[int, queue.Queue] | None:
        """Add ``request`` to the next batch; return its key and token queue, or None when the engine is busy."""
        with self._condition:
            if self._stopping or not self._accepting or len(self._pending) >= ENGINE_BATCH_SIZE:
                return None
            key = next(self._keys)
            tokens: queue.Queue = queue.Queue()
            request.set_opaque_data(key)
            self._pending.append((key, request, tokens))
            self._condition.notify()
            return key, tokens

    def cancel(self, key: int) -> None:
        with self._condition:
            self._cancelled.add(key)
            self._condition.notify()

    def stop(self) -> None:
        """Stop the thread, fail the requests still in flight and release the engine."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join(timeout=10)
        self._engine = None

    @property
    def active_requests(self) -> int:
        """The number of requests in the engine that a reader still waits on, for tests and metrics."""
        return len(self._streams)

    def _next_work(self) -> list[tuple[int, Any, queue.Queue]] | None:
        """Wait for work; return the requests that start a batch now, or None to stop."""
        with self._condition:
            while not (self._streams or self._pending or self._cancelled or self._stopping):
                self._condition.wait()
            if self._stopping:
                return None
            cancelled, self._cancelled = self._cancelled, set()
            for key in cancelled:
                if self._streams.pop(key, None) is not None:
                    self._abandoned = True
            starting: list[tuple[int, Any, queue.Queue]] = []
            if not self._streams:
                starting = [entry for entry in self._pending if entry[0] not in cancelled]
                self._pending.clear()
                self._accepting = not starting
            return starting

    def _start_batch(self, starting: list[tuple[int, Any, queue.Queue]]) -> None:
        if self._abandoned:
            # Cancelled requests are still in the old batch, and only a new engine drops
            # them. og.Engine (0.12.2) crashes when two engines exist at once.
            self._engine = None
            self._engine = self._create_engine()
            self._abandoned = False
        for key, request, tokens in starting:
            self._engine.add_request(request)
            self._streams[key] = (request, tokens)

    def _run(self) -> None:
        while True:
            starting = self._next_work()
            if starting is None:
                break
            try:
                if starting or (self._abandoned and not self._streams):
                    self._start_batch(starting)
                if not self._streams:
                    continue
                with self._step_lock:
                    self.steps += 1
                    try:
                        request = self._engine.step()
                    except RuntimeError:
                        # A step whose requests all end on an end-of-sequence token has no token
                        # to hand out, and og.Engine (0.12.2) raises "Expected at least one
                        # request to be ready". Those requests are done; anything else is a
                        # real failure.
                        if not self._drain_finished():
                            raise
                        request = None
                    else:
                        if request is None:
                            self._drain_all()
                        else:
                            self._drain(request)
                        # A request that ends on an end-of-sequence token in a batch with others
                        # is never returned by step(), so its stream would wait forever.
                        self._drain_finished()
            except Exception as error:  # a failed step fails every request in flight, not the thread
                logger.exception("GenAI engine step failed; failing %d requests", len(self._streams))
                for _, tokens in self._streams.values():
                    tokens.put(error)
                self._streams.clear()
                self._abandoned = True
            if not self._streams:
                with self._condition:
                    self._accepting = True

        with self._condition:
            orphans = [tokens for _, _, tokens in self._pending]
            self._pending.clear()
        for tokens in [*orphans, *(tokens for _, tokens in self._streams.values())]:
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
