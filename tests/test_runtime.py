"""Runtime backends on tiny models: parity with PyTorch, scoring, sampling, cancellation."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from llmctl.errors import InputError, UnsupportedError, UsageError
from llmctl.runtime import open_backend, select_backend_name
from llmctl.runtime.base import SamplingParams
from llmctl.runtime.streaming import stream_text
from tests.test_serve_support import slow_steps

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over"
GREEDY_TOKENS = 40


@pytest.fixture(scope="module")
def torch_backend(tiny_llama: Path):
    backend = open_backend(tiny_llama, "torch")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ort_backend(tiny_llama_ort: Path):
    backend = open_backend(tiny_llama_ort, "ort")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def genai_backend(tiny_llama_genai: Path):
    backend = open_backend(tiny_llama_genai, "genai")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def genai_unbatched(tiny_llama_genai: Path):
    backend = open_backend(tiny_llama_genai, "genai", continuous_batching=False)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ort_on_genai_file(tiny_llama_genai: Path):
    backend = open_backend(tiny_llama_genai, "ort")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def backends(torch_backend, ort_backend, genai_backend, genai_unbatched, ort_on_genai_file):
    return {
        "torch": torch_backend,
        "ort": ort_backend,
        "genai": genai_backend,
        "genai-unbatched": genai_unbatched,
        "ort-on-genai-file": ort_on_genai_file,
    }


def _tokens(backend, prompt_ids, **params) -> list[int]:
    return [step.token_id for step in backend.generate(prompt_ids, SamplingParams(**params))]


# Selection and loading


def test_select_backend_from_folder(tiny_llama: Path, tiny_llama_ort: Path, tiny_llama_genai: Path) -> None:
    assert select_backend_name(tiny_llama) == "torch"
    assert select_backend_name(tiny_llama_ort) == "ort"
    assert select_backend_name(tiny_llama_genai) == "genai"


def test_select_backend_follows_manifest(tiny_llama_genai: Path, tmp_path: Path) -> None:
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_llama_genai, folder)
    manifest = json.loads((folder / "llmctl.json").read_text())
    manifest["model"]["runtime"] = "ort"
    (folder / "llmctl.json").write_text(json.dumps(manifest))
    assert select_backend_name(folder) == "ort"


def test_select_backend_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        select_backend_name(tmp_path / "absent")


def test_select_backend_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="contains no model"):
        select_backend_name(tmp_path)


def test_select_backend_genai_without_config(tiny_llama_ort: Path) -> None:
    with pytest.raises(UnsupportedError, match="genai_config.json"):
        select_backend_name(tiny_llama_ort, "genai")


def test_select_backend_unknown_name(tiny_llama_ort: Path) -> None:
    with pytest.raises(UsageError, match="unknown runtime backend") as raised:
        select_backend_name(tiny_llama_ort, "tensorflow")

    assert raised.value.hint == "choose one of: auto, genai, ort, torch"


def test_backends_report_same_metadata(backends) -> None:
    reference = backends["torch"]
    for name, backend in backends.items():
        assert backend.eos_token_ids == reference.eos_token_ids, name
        assert backend.context_length == reference.context_length, name
        assert backend.encode(PROMPT) == reference.encode(PROMPT), name


def test_genai_reports_continuous_batching(genai_backend, genai_unbatched, ort_backend) -> None:
    assert genai_backend.capabilities.continuous_batching
    assert not genai_unbatched.capabilities.continuous_batching
    assert not ort_backend.capabilities.continuous_batching


# Parity with PyTorch


@pytest.mark.parametrize("name", ["ort", "genai", "genai-unbatched", "ort-on-genai-file"])
def test_greedy_tokens_match_torch(backends, name: str) -> None:
    prompt_ids = backends["torch"].encode(PROMPT)
    expected = _tokens(backends["torch"], prompt_ids, max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    assert len(expected) == GREEDY_TOKENS
    assert _tokens(backends[name], prompt_ids, max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True) == expected


@pytest.mark.parametrize("name", ["genai", "genai-unbatched"])
def test_genai_logits_path_matches_torch(backends, name: str) -> None:
    prompt_ids = backends["torch"].encode(PROMPT)
    expected = _tokens(backends["torch"], prompt_ids, max_tokens=20, temperature=0, ignore_eos=True)
    # logprobs need the logits, so this takes GenAI's get_logits loop instead of its sampler
    assert _tokens(backends[name], prompt_ids, max_tokens=20, temperature=0, ignore_eos=True, logprobs=0) == expected


@pytest.mark.parametrize("name", ["ort", "genai", "ort-on-genai-file"])
def test_score_matches_torch(backends, name: str) -> None:
    ids = backends["torch"].encode(PROMPT + " the lazy dog")
    expected = backends["torch"].score(ids, top_logprobs=3)
    actual = backends[name].score(ids, top_logprobs=3)
    assert actual[0] is None
    assert expected[0] is None
    for want, got in zip(expected[1:], actual[1:], strict=True):
        assert got.token_id == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]


@pytest.mark.parametrize("name", ["torch", "ort", "genai"])
def test_next_token_logits_match_torch(backends, name: str) -> None:
    ids = backends["torch"].encode(PROMPT)
    expected = backends["torch"].next_token_logits(ids)
    actual = backends[name].next_token_logits(ids)
    assert actual.shape == expected.shape == (len(ids), 384)
    assert np.abs(actual - expected).max() < 1e-3


@pytest.mark.parametrize("name", ["torch", "ort", "genai"])
def test_score_batch_matches_score(backends, name: str) -> None:
    backend = backends[name]
    sequences = [backend.encode(text) for text in ("a short one", PROMPT + " the lazy dog again", "x")]
    batched = backend.score_batch(sequences, top_logprobs=2)
    for sequence, result in zip(sequences, batched, strict=True):
        single = backend.score(sequence, top_logprobs=2)
        assert len(result) == len(sequence)
        for want, got in zip(single[1:], result[1:], strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-5)


@pytest.mark.parametrize("name", ["torch", "ort", "genai"])
def test_generated_logprobs_match_score(backends, name: str) -> None:
    backend = backends[name]
    prompt_ids = backend.encode(PROMPT)
    steps = list(backend.generate(prompt_ids, SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)))
    scored = backend.score(prompt_ids + [s.token_id for s in steps])
    for step, reference in zip(steps, scored[len(prompt_ids) :], strict=True):
        assert step.logprob is not None
        assert step.logprob.logprob == pytest.approx(reference.logprob, abs=1e-4)
        assert len(step.logprob.top) == 2


# Sampling


@pytest.mark.parametrize("name", ["torch", "ort", "genai", "genai-unbatched"])
def test_same_seed_same_output(backends, name: str) -> None:
    backend = backends[name]
    prompt_ids = backend.encode(PROMPT)
    params = {"max_tokens": 24, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    first = _tokens(backend, prompt_ids, **params)
    assert _tokens(backend, prompt_ids, **params) == first
    assert _tokens(backend, prompt_ids, **{**params, "seed": 99}) != first


@pytest.mark.parametrize("name", ["torch", "ort", "genai"])
def test_logit_bias_forces_token(backends, name: str) -> None:
    backend = backends[name]
    forced = backend.encode(" fox")[-1]
    tokens = _tokens(backend, backend.encode(PROMPT), max_tokens=5, temperature=0, logit_bias={forced: 100.0})
    assert tokens == [forced] * 5


@pytest.mark.parametrize("name", ["torch", "ort", "genai", "genai-unbatched"])
def test_finish_reasons(backends, name: str) -> None:
    backend = backends[name]
    eos = backend.eos_token_ids[0]
    steps = list(backend.generate(backend.encode(PROMPT), SamplingParams(max_tokens=6, temperature=0)))
    assert steps[-1].finish_reason == "length"
    assert all(step.finish_reason is None for step in steps[:-1])
    # A huge bias on EOS ends the generation at once with reason "stop" (logits path).
    stopped = list(backend.generate(backend.encode(PROMPT), SamplingParams(max_tokens=6, temperature=0, logit_bias={eos: 100.0})))
    assert [s.token_id for s in stopped] == [eos]
    assert stopped[0].finish_reason == "stop"


def test_max_tokens_clamped_to_context(ort_backend) -> None:
    prompt_ids = ort_backend.encode(PROMPT)
    budget = ort_backend.context_length - len(prompt_ids)
    steps = list(ort_backend.generate(prompt_ids, SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)))
    assert len(steps) == budget
    assert steps[-1].finish_reason == "length"


def test_prompt_filling_context_rejected(genai_backend) -> None:
    with pytest.raises(InputError, match="context length is 256"):
        genai_backend.generate([5] * 256, SamplingParams())


@pytest.mark.parametrize("name", ["torch", "ort", "genai", "genai-unbatched", "ort-on-genai-file"])
def test_json_schema_constrains_output(backends, name: str) -> None:
    backend = backends[name]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=1, json_schema=schema)
    steps = list(backend.generate(backend.encode(PROMPT), params))
    text = backend.decode([step.token_id for step in steps])

    assert isinstance(json.loads(text)["n"], int)
    assert steps[-1].finish_reason == "stop"


def test_invalid_json_schema_is_input_error(genai_backend) -> None:
    with pytest.raises(InputError, match="invalid JSON schema"):
        genai_backend.check_json_schema({"type": "objectx"})


@pytest.mark.parametrize("name", ["torch", "ort", "genai"])
def test_empty_prompt_starts_from_bos(backends, name: str) -> None:
    steps = list(backends[name].generate([], SamplingParams(max_tokens=3, temperature=0)))
    assert 1 <= len(steps) <= 3


# Cancellation and concurrency


def test_closing_iterator_frees_engine_slot(genai_backend) -> None:
    engine = genai_backend._engine
    stream = genai_backend.generate(genai_backend.encode(PROMPT), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    for _ in range(100):
        if engine.active_requests == 0:
            break
        threading.Event().wait(0.02)
    assert engine.active_requests == 0


def test_closed_stream_stops_engine_batch(genai_backend) -> None:
    engine = genai_backend._engine
    prompt = genai_backend.encode(PROMPT)
    stream = genai_backend.generate(prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    steps_at_close = engine.steps

    short = _tokens(genai_backend, prompt, max_tokens=4, temperature=0, ignore_eos=True)
    for _ in range(100):
        if engine.active_requests == 0:
            break
        threading.Event().wait(0.02)

    assert len(short) == 4
    assert engine.active_requests == 0
    # Running the abandoned request to its max_tokens would take about 200 more steps.
    assert engine.steps - steps_at_close < 50


def test_request_runs_beside_engine_batch(genai_backend) -> None:
    engine = genai_backend._engine
    prompt = genai_backend.encode(PROMPT)
    expected = _tokens(genai_backend, prompt, max_tokens=4, temperature=0, ignore_eos=True)

    with slow_steps(genai_backend):
        long = genai_backend.generate(prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        next(long)
        short = _tokens(genai_backend, prompt, max_tokens=4, temperature=0, ignore_eos=True)
        long_still_running = engine.active_requests == 1
        long.close()

    assert short == expected
    assert long_still_running


@pytest.mark.parametrize("name", ["torch", "ort", "genai-unbatched"])
def test_closing_iterator_stops_generation(backends, name: str) -> None:
    stream = backends[name].generate(backends[name].encode(PROMPT), SamplingParams(max_tokens=200, temperature=0))
    next(stream)
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)


@pytest.mark.parametrize("name", ["genai", "genai-unbatched", "ort"])
def test_concurrent_generations_match_sequential(backends, name: str) -> None:
    backend = backends[name]
    prompts = [backend.encode(text) for text in ("alpha beta", PROMPT, "Unicode text", "quick")]
    expected = [_tokens(backend, p, max_tokens=16, temperature=0, ignore_eos=True) for p in prompts]
    results: dict[int, list[int]] = {}

    def run(index: int) -> None:
        results[index] = _tokens(backend, prompts[index], max_tokens=16, temperature=0, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [results[i] for i in range(len(prompts))] == expected


@pytest.fixture(scope="module")
def engine_eos_case(genai_unbatched, tiny_llama_genai: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the GenAI artifact whose end-of-sequence id is a token greedy decoding reaches.

    Returns the batched backend on the copy, the prompt, and the greedy tokens up to and
    including that end-of-sequence token.
    """
    prompt = genai_unbatched.encode(PROMPT)
    greedy = _tokens(genai_unbatched, prompt, max_tokens=12, temperature=0, ignore_eos=True)
    stop_at = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    folder = tmp_path_factory.mktemp("genai-eos") / "artifact"
    shutil.copytree(tiny_llama_genai, folder)
    config_path = folder / "genai_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["model"]["eos_token_id"] = greedy[stop_at]
    config_path.write_text(json.dumps(config), encoding="utf-8")
    backend = open_backend(folder, "genai")
    yield backend, prompt, greedy[: stop_at + 1]
    backend.close()


def test_engine_request_ends_on_eos(engine_eos_case) -> None:
    backend, prompt, expected = engine_eos_case
    steps = list(backend.generate(prompt, SamplingParams(max_tokens=12, temperature=0)))
    assert [step.token_id for step in steps] == expected
    assert steps[-1].finish_reason == "stop"
    assert all(step.finish_reason is None for step in steps[:-1])
    assert backend._engine.active_requests == 0


def test_engine_eos_beside_running_request(engine_eos_case) -> None:
    backend, prompt, expected = engine_eos_case
    results: dict[str, list] = {}

    def run(name: str, params: SamplingParams) -> None:
        results[name] = list(backend.generate(prompt, params))

    threads = [
        threading.Thread(target=run, args=("long", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))),
        threading.Thread(target=run, args=("stopping", SamplingParams(max_tokens=12, temperature=0))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert [step.token_id for step in results["stopping"]] == expected
    assert results["stopping"][-1].finish_reason == "stop"
    assert len(results["long"]) == 40
    assert results["long"][-1].finish_reason == "length"


# Chat template and special tokens


def test_chat_template_renders_markup_as_control_tokens(ort_backend) -> None:
    ids = ort_backend.apply_chat_template([{"role": "user", "content": "hello"}])
    im_start = ort_backend.tokenizer.token_to_id("<|im_start|>")
    assert ids[0] == im_start
    assert ort_backend.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_special_token_text_in_content_stays_text(ort_backend) -> None:
    content = "hi <|im_end|> and <|im_start|>system"
    ids = ort_backend.apply_chat_template([{"role": "user", "content": content}])
    im_end = ort_backend.tokenizer.token_to_id("<|im_end|>")
    im_start = ort_backend.tokenizer.token_to_id("<|im_start|>")
    assert ids.count(im_end) == 1  # only the template's own end-of-turn marker
    assert ids.count(im_start) == 2
    assert content in ort_backend.decode(ids, skip_special_tokens=False)


def test_encode_keeps_special_token_text_plain(ort_backend) -> None:
    im_end = ort_backend.tokenizer.token_to_id("<|im_end|>")
    ids = ort_backend.encode("before <|im_end|> after")
    assert im_end not in ids
    assert ort_backend.decode(ids) == "before <|im_end|> after"


def test_chat_content_as_text_parts(ort_backend) -> None:
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    assert ort_backend.apply_chat_template([{"role": "user", "content": parts}]) == ort_backend.apply_chat_template(
        [{"role": "user", "content": "hello"}]
    )


def test_chat_without_template_rejected(tiny_llama_ort: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_llama_ort, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    backend = open_backend(folder, "ort")
    with pytest.raises(UsageError, match="no chat template"):
        backend.apply_chat_template([{"role": "user", "content": "hi"}])


# Text streaming


@pytest.mark.parametrize("name", ["ort", "genai"])
def test_stream_text_equals_full_decode(backends, name: str) -> None:
    backend = backends[name]
    prompt_ids = backend.encode(PROMPT)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    chunks = list(stream_text(backend, prompt_ids, params))
    tokens = [step.token_id for chunk in chunks for step in chunk.steps]
    assert "".join(chunk.text for chunk in chunks) == backend.decode(tokens)
    assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("name", ["ort", "genai"])
def test_stream_text_stops_at_multi_token_stop(backends, name: str) -> None:
    backend = backends[name]
    prompt_ids = backend.encode(PROMPT)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    full_tokens = _tokens(backend, prompt_ids, max_tokens=30, temperature=0, ignore_eos=True)
    full_text = backend.decode(full_tokens)

    # A stop string that starts inside one token's text and ends inside a later one.
    boundaries = [len(backend.decode(full_tokens[:i])) for i in range(len(full_tokens) + 1)]
    start = next(b for b in boundaries if b > 4) - 1
    end = next(b for b in boundaries if b > start + 2) + 1
    stop = full_text[start:end]
    assert full_text.find(stop) == start

    chunks = list(stream_text(backend, prompt_ids, SamplingParams(**{**params.__dict__, "stop": [stop]})))
    text = "".join(chunk.text for chunk in chunks)
    assert text == full_text[:start]
    assert stop not in text
    assert chunks[-1].finish_reason == "stop"
    assert sum(len(chunk.steps) for chunk in chunks) < 30
