"""The continuous-batching engine on a tiny GenAI-builder model: batched steps give the same
tokens as one sequence at a time, through joins, leaves, chunked prompts and cache growth."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from llmctl.errors import RuntimeBackendError
from llmctl.runtime import batching, open_backend
from llmctl.runtime.base import SamplingParams
from llmctl.runtime.batching import BatchEngine, TurnLock, updates_cache_in_place
from llmctl.runtime.ort import find_decoder_file
from tests.test_serve_support import throttled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_llama_genai: Path):
    """The same graph run one sequence at a time, each with its own cache."""
    backend = open_backend(tiny_llama_genai, "ort", continuous_batching=False)
    yield backend
    backend.close()


@pytest.fixture()
def engine(reference):
    engine = _new_engine(reference)
    yield engine
    engine.stop()


def _greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)


def _submit(engine: BatchEngine, backend, prompt: list[int], params: SamplingParams, eos_ids=()):
    return engine.generate(prompt, params.max_tokens, backend.make_sampler(params), eos_ids, ignore_eos=params.ignore_eos)


def _tokens(stream) -> list[int]:
    return [step.token_id for step in stream]


def _new_engine(reference, lock: TurnLock | None = None) -> BatchEngine:
    return BatchEngine(reference.decoder, context_length=reference.context_length, step_lock=lock)


def _wait_for_active(engine: BatchEngine, count: int, timeout_s: float = 5.0) -> None:
    """Wait until ``count`` sequences are queued or running in ``engine``."""
    deadline = time.monotonic() + timeout_s
    while engine.active_requests != count and time.monotonic() < deadline:
        time.sleep(0.01)


def _run_together(engine: BatchEngine, backend, jobs: list[tuple[list[int], SamplingParams]], lock: TurnLock | None = None) -> list[list[int]]:
    """Generate every job from its own thread; with ``lock`` (the engine's step lock), every
    job is queued before the engine runs its first model call."""
    results: list[list[int]] = [[] for _ in jobs]

    def run(index: int) -> None:
        prompt, params = jobs[index]
        results[index] = _tokens(_submit(engine, backend, prompt, params))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    if lock is None:
        for thread in threads:
            thread.start()
    else:
        with lock:
            for thread in threads:
                thread.start()
            _wait_for_active(engine, len(jobs))
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _run_queued(engine: BatchEngine, lock: TurnLock, run, names: list[str]) -> None:
    """Run ``run(name)`` for each name on its own thread, each queued in order while ``lock``
    (the engine's step lock) is held, so all are queued before the engine's first model call."""
    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    with lock:
        for count, thread in enumerate(threads, start=1):
            thread.start()
            _wait_for_active(engine, count)
    for thread in threads:
        thread.join(timeout=60)


def _jobs(reference) -> list[tuple[list[int], SamplingParams]]:
    texts = ["alpha", "The quick brown fox jumps over the lazy dog " * 3, "Unicode text", "a b c d e f g h i j k l"]
    # Different lengths, so sequences join and leave while others run.
    return [(reference.encode(text), _greedy(6 + 9 * i)) for i, text in enumerate(texts)]


def test_builder_graph_updates_cache_in_place(tiny_llama_genai: Path, tiny_llama_ort: Path) -> None:
    assert updates_cache_in_place(find_decoder_file(tiny_llama_genai))
    assert not updates_cache_in_place(find_decoder_file(tiny_llama_ort))


def test_batched_tokens_match_sequential(reference, engine) -> None:
    jobs = _jobs(reference)
    expected = [_tokens(reference.generate(prompt, params)) for prompt, params in jobs]
    assert _run_together(engine, reference, jobs) == expected
    assert engine.active_requests == 0


def test_chunked_prompts_keep_tokens(reference, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prompts span several chunks and the cache grows several times while rows join and leave.
    monkeypatch.setattr(batching, "PREFILL_CHUNK", 3)
    monkeypatch.setattr(batching, "BUSY_PREFILL_CHUNK", 3)
    monkeypatch.setattr(batching, "CAPACITY_STEP", 4)
    # Every cache counts as large, so it also shrinks whenever a long sequence leaves.
    monkeypatch.setattr(batching, "IDLE_CACHE_BYTES", 0)
    jobs = _jobs(reference)
    expected = [_tokens(reference.generate(prompt, params)) for prompt, params in jobs]
    assert _run_together(engine, reference, jobs) == expected


def test_prefill_row_moves_on_leave(reference, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every prompt takes several chunks and every budget is short, so each sequence finishes
    # while the next one's prompt is half-way in: the half-filled row must move with it.
    monkeypatch.setattr(batching, "PREFILL_CHUNK", 3)
    monkeypatch.setattr(batching, "BUSY_PREFILL_CHUNK", 3)
    lock = TurnLock()
    engine = _new_engine(reference, lock)
    try:
        prompt = reference.encode("The quick brown fox jumps over the lazy dog " * 2)
        jobs = [(prompt[i:], _greedy(2 + i)) for i in range(4)]
        expected = [_tokens(reference.generate(p, params)) for p, params in jobs]
        assert _run_together(engine, reference, jobs, lock) == expected
    finally:
        engine.stop()


def test_short_prompt_overtakes_long_prompt(reference, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "PREFILL_CHUNK", 2)
    monkeypatch.setattr(batching, "BUSY_PREFILL_CHUNK", 2)
    lock = TurnLock()
    engine = _new_engine(reference, lock)
    prompts = {
        "long": reference.encode("The quick brown fox jumps over the lazy dog " * 3),
        "short": reference.encode("alpha")[:2],
    }
    expected = {name: _tokens(reference.generate(prompt, _greedy(3))) for name, prompt in prompts.items()}
    first_tokens: list[str] = []
    results: dict[str, list[int]] = {}

    def run(name: str) -> None:
        stream = _submit(engine, reference, prompts[name], _greedy(3))
        first = next(stream)
        first_tokens.append(name)
        results[name] = [first.token_id, *_tokens(stream)]

    try:
        _run_queued(engine, lock, run, ["long", "short"])
    finally:
        engine.stop()

    assert first_tokens == ["short", "long"]
    assert results == expected


def test_failed_prompt_moves_other_prompt_row(reference, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prompt "a" fails part-way while prompt "b", further down the list, has chunks in its
    # row: b's row moves into a's and b must still generate the right tokens.
    monkeypatch.setattr(batching, "PREFILL_CHUNK", 2)
    monkeypatch.setattr(batching, "BUSY_PREFILL_CHUNK", 2)
    lock = TurnLock()
    engine = _new_engine(reference, lock)
    prompts = {
        "a": reference.encode("The quick brown fox jumps over the lazy dog " * 3),
        "b": reference.encode("Unicode text and more words here"),
    }
    expected = _tokens(reference.generate(prompts["b"], _greedy(4)))
    run_model = engine._run_model

    def fail_on_a(ids, *args):
        # a's first two chunks run, then b's first (the shortest), then a's third (the
        # oldest), which fails while b's row already contains a chunk.
        if ids[0].tolist() == prompts["a"][4:6]:
            raise RuntimeError("simulated failure of prompt a")
        return run_model(ids, *args)

    monkeypatch.setattr(engine, "_run_model", fail_on_a)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = _tokens(_submit(engine, reference, prompts[name], _greedy(4)))
        except RuntimeError as error:
            results[name] = str(error)

    try:
        _run_queued(engine, lock, run, ["a", "b"])
    finally:
        engine.stop()

    assert results["a"] == "simulated failure of prompt a"
    assert results["b"] == expected


def test_cache_shrinks_after_long_sequence(reference, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "IDLE_CACHE_BYTES", 0)
    monkeypatch.setattr(batching, "CAPACITY_STEP", 8)
    lock = TurnLock()
    engine = _new_engine(reference, lock)
    prompt = reference.encode("alpha")
    expected = _tokens(reference.generate(prompt, _greedy(40)))
    long_prompt = reference.encode("The quick brown fox jumps over the lazy dog " * 4)
    with throttled(lock):
        short = _submit(engine, reference, prompt, _greedy(40))
        first = next(short)
        list(_submit(engine, reference, long_prompt, _greedy(2)))
        shrunk_while_running = False
        for _ in range(100):
            if engine.active_requests != 1:
                break
            if engine._cache.capacity < len(long_prompt):
                shrunk_while_running = True
                break
            time.sleep(0.002)
        rest = _tokens(short)
    engine.stop()

    assert [first.token_id, *rest] == expected
    assert shrunk_while_running


def test_long_prompt_reserves_cache_once(reference, monkeypatch: pytest.MonkeyPatch) -> None:
    # The prompt runs in about 30 chunks beside a running sequence, and every cache counts as
    # large: the cache must neither regrow per chunk nor shrink below the prompt part-way in.
    monkeypatch.setattr(batching, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(batching, "BUSY_PREFILL_CHUNK", 4)
    monkeypatch.setattr(batching, "IDLE_CACHE_BYTES", 0)
    monkeypatch.setattr(batching, "CAPACITY_STEP", 8)
    lock = TurnLock()
    engine = _new_engine(reference, lock)
    short_prompt = reference.encode("alpha")
    long_prompt = reference.encode("The quick brown fox jumps over the lazy dog " * 4)
    expected = _tokens(reference.generate(long_prompt, _greedy(3)))
    with throttled(lock):
        short = _submit(engine, reference, short_prompt, _greedy(60))
        next(short)
        moves_before = engine.stats.cache_moves
        tokens = _tokens(_submit(engine, reference, long_prompt, _greedy(3)))
        moves = engine.stats.cache_moves - moves_before
        short.close()
    engine.stop()

    assert tokens == expected
    assert moves <= 3


def test_seeded_sampling_matches_sequential(reference, engine) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, logprobs=2, frequency_penalty=0.5)
    prompt = reference.encode("Once upon a time")
    expected = list(reference.generate(prompt, params))
    steps = list(_submit(engine, reference, prompt, params))
    assert [s.token_id for s in steps] == [s.token_id for s in expected]
    assert steps[0].logprob is not None
    assert steps[0].logprob.logprob == pytest.approx(expected[0].logprob.logprob, abs=1e-5)


def test_eos_ends_only_its_row(reference, engine) -> None:
    prompt = reference.encode("alpha beta")
    greedy = _tokens(reference.generate(prompt, _greedy(12)))
    stop_at = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])

    stopping = list(_submit(engine, reference, prompt, SamplingParams(max_tokens=12, temperature=0), [greedy[stop_at]]))
    assert [s.token_id for s in stopping] == greedy[: stop_at + 1]
    assert stopping[-1].finish_reason == "stop"
    long = _submit(engine, reference, prompt, _greedy(40), [greedy[stop_at]])
    assert len(list(long)) == 40


def test_closed_stream_frees_row(reference, engine) -> None:
    prompt = reference.encode("alpha")
    stream = _submit(engine, reference, prompt, _greedy(500))
    next(stream)
    stream.close()
    _wait_for_active(engine, 0)
    assert engine.active_requests == 0
    # The engine keeps serving after the cancelled sequence left.
    assert _tokens(_submit(engine, reference, prompt, _greedy(3))) == _tokens(reference.generate(prompt, _greedy(3)))


@pytest.mark.parametrize("failing_call", [1, 3])
def test_failed_step_engine_recovers(reference, engine, monkeypatch: pytest.MonkeyPatch, failing_call: int) -> None:
    # Call 1 is the prompt, call 3 a decode step.
    run_model = engine._run_model
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise RuntimeError("simulated onnxruntime failure")
        return run_model(*args, **kwargs)

    monkeypatch.setattr(engine, "_run_model", fail_once)
    prompt = reference.encode("alpha")
    with pytest.raises(RuntimeError, match="simulated"):
        list(_submit(engine, reference, prompt, _greedy(4)))
    assert _tokens(_submit(engine, reference, prompt, _greedy(4))) == _tokens(reference.generate(prompt, _greedy(4)))


class _FailingSampler:
    """Wraps a sampler and raises on its third token, as a grammar with no valid token would."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.calls = 0

    def step(self, logits):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeBackendError("simulated sampler failure")
        return self.sampler.step(logits)


def test_sampler_failure_ends_only_its_sequence(reference) -> None:
    lock = TurnLock()
    engine = _new_engine(reference, lock)
    prompt = reference.encode("alpha beta")
    params = _greedy(40)
    expected = _tokens(reference.generate(prompt, params))
    # Throttled, so the healthy sequence is still running when the failing one fails.
    with throttled(lock):
        healthy = _submit(engine, reference, prompt, params)
        first = next(healthy)
        failing = engine.generate(prompt, 40, _FailingSampler(reference.make_sampler(params)), [], ignore_eos=True)
        with pytest.raises(RuntimeBackendError, match="simulated"):
            list(failing)
        rest = _tokens(healthy)
    engine.stop()

    assert [first.token_id, *rest] == expected


def test_stopped_engine_rejects_sequences(reference) -> None:
    engine = _new_engine(reference)
    engine.stop()
    with pytest.raises(RuntimeBackendError, match="unloaded"):
        list(_submit(engine, reference, reference.encode("alpha"), _greedy(4)))
