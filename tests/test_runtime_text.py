"""Units of the runtime's text layer: sampler, incremental detokenizer, stop strings."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from llmctl.runtime.base import SamplingParams
from llmctl.runtime.detokenize import IncrementalDetokenizer, StopStringMatcher
from llmctl.runtime.sampling import Sampler, log_softmax

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
HARD_TEXT = "Hello  world, 東京 🙂 naïve  spaces\tend 🚀🎉 café"


def _logits(seed: int = 0, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, vocab)


# Sampler


def test_sampler_greedy_is_argmax() -> None:
    logits = _logits()
    token, logprob = Sampler(SamplingParams(temperature=0), 50).step(logits)
    assert token == int(np.argmax(logits))
    assert logprob is None


def test_sampler_greedy_skips_masked_end_of_sequence() -> None:
    logits = _logits()
    best = int(np.argmax(logits))
    sampler = Sampler(SamplingParams(temperature=0, ignore_eos=True), 50, eos_token_ids=[best])
    token, _ = sampler.step(logits)
    assert token != best
    assert token == int(np.argsort(logits)[-2])


def test_sampler_logit_bias_forces_token() -> None:
    sampler = Sampler(SamplingParams(temperature=0, logit_bias={7: 100.0}), 50)
    assert sampler.step(_logits())[0] == 7


def test_sampler_frequency_penalty_avoids_repeat() -> None:
    logits = np.zeros(10)
    logits[3] = 1.0
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=2.0), 10)
    first = sampler.step(logits)[0]
    second = sampler.step(logits)[0]
    assert first == 3
    assert second != 3


def test_sampler_presence_penalty_avoids_repeat() -> None:
    logits = np.zeros(10)
    logits[3] = 1.0
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=2.0), 10)
    assert [sampler.step(logits)[0] for _ in range(2)] == [3, 0]


def test_sampler_same_seed_same_tokens() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    first = [Sampler(params, 50).step(_logits(i))[0] for i in range(20)]
    again = [Sampler(params, 50).step(_logits(i))[0] for i in range(20)]
    assert first == again


def test_sampler_seed_changes_tokens() -> None:
    a = Sampler(SamplingParams(temperature=5.0, seed=1), 50)
    b = Sampler(SamplingParams(temperature=5.0, seed=2), 50)
    assert [a.step(_logits(i))[0] for i in range(30)] != [b.step(_logits(i))[0] for i in range(30)]


def test_sampler_top_k_one_is_greedy() -> None:
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=1, seed=0), 50)
    for i in range(10):
        assert sampler.step(_logits(i))[0] == int(np.argmax(_logits(i)))


def test_sampler_top_p_keeps_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=3), 4)
    chosen = {sampler.step(logits)[0] for _ in range(200)}
    assert chosen == {0, 1}


def test_sampler_ignore_eos_masks_eos() -> None:
    logits = np.zeros(5)
    logits[2] = 10.0
    sampler = Sampler(SamplingParams(temperature=0, ignore_eos=True), 5, eos_token_ids=[2])
    assert sampler.step(logits)[0] != 2


def test_sampler_logprobs_from_raw_distribution() -> None:
    logits = _logits()
    sampler = Sampler(SamplingParams(temperature=0.5, logprobs=3, logit_bias={1: 5.0}, seed=0), 50)
    token, logprob = sampler.step(logits)
    expected = log_softmax(logits)
    assert logprob is not None
    assert logprob.token_id == token
    assert logprob.logprob == pytest.approx(expected[token])
    assert [t for t, _ in logprob.top] == list(np.argsort(-expected)[:3])
    assert [v for _, v in logprob.top] == sorted((v for _, v in logprob.top), reverse=True)


def test_sampler_cuts_padded_vocab() -> None:
    logits = np.zeros(64)
    logits[60] = 50.0  # padding column past the real vocabulary
    assert Sampler(SamplingParams(temperature=0), 50).step(logits)[0] < 50


# Incremental detokenizer


@pytest.fixture(scope="module")
def byte_level(tiny_llama: Path):
    from llmctl.runtime.tokenizer import ArtifactTokenizer

    return ArtifactTokenizer(tiny_llama)


@pytest.fixture(scope="module")
def sentencepiece_model():
    """A SentencePiece BPE model with byte fallback, trained on the test corpus."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text(encoding="utf-8").splitlines() * 4),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _stream(decode, ids: list[int], prompt: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(decode, prompt)
    deltas = [detokenizer.add(token) for token in ids]
    deltas.append(detokenizer.flush())
    return deltas


def test_detokenizer_byte_level_matches_full_decode(byte_level) -> None:
    ids = byte_level.encode(HARD_TEXT)
    deltas = _stream(byte_level.decode, ids, byte_level.encode("Question:"))
    assert "".join(deltas) == HARD_TEXT
    assert "".join(deltas) == byte_level.decode(ids)


def test_detokenizer_byte_level_never_splits_characters(byte_level) -> None:
    ids = byte_level.encode("🙂🚀🎉東京")
    assert len(ids) > 5  # the emoji really span several byte tokens
    deltas = _stream(byte_level.decode, ids, [])
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == "🙂🚀🎉東京"


def test_detokenizer_byte_level_keeps_spaces(byte_level) -> None:
    text = "  two leading spaces and  double  gaps "
    deltas = _stream(byte_level.decode, byte_level.encode(text), byte_level.encode("x"))
    assert "".join(deltas) == text


def test_detokenizer_sentencepiece_matches_full_decode(sentencepiece_model) -> None:
    sp = sentencepiece_model
    ids = sp.encode(HARD_TEXT)
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback pieces present
    deltas = _stream(sp.decode, ids, [])
    assert "".join(deltas) == sp.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)


def test_detokenizer_sentencepiece_keeps_leading_space(sentencepiece_model) -> None:
    sp = sentencepiece_model
    prompt = sp.encode("The answer is")
    ids = sp.encode("The answer is Paris")[len(prompt) :]
    assert "".join(_stream(sp.decode, ids, prompt)) == " Paris"


def test_detokenizer_flush_returns_incomplete_bytes(byte_level) -> None:
    ids = byte_level.encode("🙂")
    detokenizer = IncrementalDetokenizer(byte_level.decode)
    assert detokenizer.add(ids[0]) == ""
    assert detokenizer.flush() == byte_level.decode(ids[:1])


# Stop strings


@pytest.mark.parametrize(
    ("pieces", "stop", "expected"),
    [
        (["Hello", " wor", "ld", "!"], ["world"], "Hello "),
        (["ab", "c<", "/s", "> tail"], ["</s>"], "abc"),
        (["one", "two"], ["ne"], "o"),
        (["x", "ENDy"], ["END"], "x"),
        (["keep", " going"], ["zzz"], "keep going"),
        (["a<", "b"], ["<stop>"], "a<b"),
    ],
)
def test_stop_matcher_cuts_at_stop(pieces: list[str], stop: list[str], expected: str) -> None:
    matcher = StopStringMatcher(stop)
    emitted = "".join(matcher.feed(piece) for piece in pieces) + matcher.flush()
    assert emitted == expected


def test_stop_matcher_holds_back_possible_prefix() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == "abc "
    assert matcher.feed("O") == ""
    assert matcher.feed("P later") == ""
    assert matcher.stopped
    assert matcher.matched == "STOP"


def test_stop_matcher_earliest_stop_wins() -> None:
    matcher = StopStringMatcher(["bb", "a"])
    assert matcher.feed("xbba") == "x"
    assert matcher.matched == "bb"
