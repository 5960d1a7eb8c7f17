"""Eval metrics against direct reference computations on a tiny model, and the gate logic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llmctl.errors import InputError, UsageError
from llmctl.eval.data import ChoiceExample, Record, custom_example, read_jsonl, sample_indices
from llmctl.eval.gates import check_gates, parse_gate, require_baseline, wilson_interval
from llmctl.eval.suite import PerplexityTask
from llmctl.eval.target import LocalTarget, perplexity_windows
from llmctl.eval.tasks import EvalContext
from llmctl.eval.tasks import multiple_choice, perplexity
from llmctl.eval.tasks.multiple_choice import score_examples
from llmctl.eval.tasks.parity import compare_logits, log_softmax

CORPUS = Path(__file__).parent / "data" / "corpus.txt"

# Authored questions in the HellaSwag layout, with endings of different byte lengths so that
# acc and acc_norm can disagree.
CHOICE_RECORDS = [
    {"ctx": "The capital of France is", "endings": ["Paris.", "Rome and Tokyo.", "a model.", "four bits."], "label": 0},
    {"ctx": "Quantization stores weights in", "endings": ["fewer bits.", "Japan.", "events and markers.", "café"], "label": 0},
    {"ctx": "The server streams tokens to the", "endings": ["client.", "capital of Italy.", "number 42.", "int8."], "label": 1},
    {"ctx": "Perplexity is the exponential of", "endings": ["the mean negative log-likelihood.", "Rome.", "0 1 2", "a"], "label": 0},
    {"ctx": "Hello, world! How are", "endings": ["you today?", "weights", "naïve tokens per second", "b"], "label": 0},
]


@pytest.fixture(scope="module")
def torch_backend(tiny_llama: Path):
    from llmctl.runtime import open_backend

    backend = open_backend(tiny_llama, "torch", threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf_model(tiny_llama: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def _context(target, tmp_path: Path, **kwargs) -> EvalContext:
    return EvalContext(target=target, suite_file=tmp_path / "suite.yaml", **kwargs)


# --- perplexity --------------------------------------------------------------------------


def _reference_perplexity(model, token_ids: list[int], context: int, stride: int) -> float:
    """The sliding-window loop of the Hugging Face perplexity guide, summing NLL over tokens."""
    import torch

    ids = torch.tensor([token_ids])
    nll_sum, count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + context, ids.size(1))
        target_length = end - previous_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        count += valid
        previous_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / count)


@pytest.mark.parametrize(("context", "stride"), [(64, 32), (48, 16), (100, 99)])
def test_perplexity_matches_transformers(torch_backend, hf_model, tmp_path: Path, context: int, stride: int) -> None:
    model, tokenizer = hf_model
    text = CORPUS.read_text(encoding="utf-8")
    # The corpus contains chat markup, which eval scores as plain text as the runtime tokenizes user text.
    token_ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert len(token_ids) > 2 * context, "the corpus must span several windows"
    expected = _reference_perplexity(model, token_ids, context, stride)

    task = PerplexityTask(name="ppl", type="perplexity", data=str(CORPUS), context=context, stride=stride)
    result = perplexity.run(task, _context(LocalTarget(torch_backend), tmp_path))

    observed = result.metrics["perplexity"]["value"]
    assert abs(observed - expected) / expected < 0.005
    assert result.metrics["perplexity"]["samples"] == len(token_ids) - 1
    assert result.details["scored_tokens"] == len(token_ids) - 1


@pytest.mark.parametrize(("count", "context", "stride"), [(10, 4, 4), (100, 16, 5), (17, 16, 16), (2, 8, 8), (33, 8, 1)])
def test_perplexity_windows_score_each_token_once(count: int, context: int, stride: int) -> None:
    scored = []
    for begin, end, first in perplexity_windows(count, context, stride):
        assert end - begin <= context
        assert begin < first <= end, "every scored token has at least one token of context in its window"
        scored.extend(range(first, end))
    assert scored == list(range(1, count))


def test_perplexity_windows_short_text() -> None:
    assert perplexity_windows(1, 8, 4) == []
    assert perplexity_windows(5, 8, 4) == [(0, 5, 1)]


def test_perplexity_averages_over_tokens(torch_backend, tmp_path: Path) -> None:
    """The last, shorter window counts by its tokens, not as one window among equals."""
    target = LocalTarget(torch_backend)
    text = CORPUS.read_text(encoding="utf-8")
    rolling = target.rolling_logprobs(text, context=64, stride=48, max_tokens=None, max_windows=None)
    task = PerplexityTask(name="ppl", type="perplexity", data=str(CORPUS), context=64, stride=48)
    result = perplexity.run(task, _context(target, tmp_path))
    assert result.metrics["nll"]["value"] == pytest.approx(-sum(rolling.logprobs) / len(rolling.logprobs))


def test_perplexity_batch_size_invariant(torch_backend, tmp_path: Path) -> None:
    """Windows of different lengths batched together are padded; padding never enters the score."""
    text = CORPUS.read_text(encoding="utf-8")
    single = LocalTarget(torch_backend, batch_size=1).rolling_logprobs(text, context=64, stride=40, max_tokens=None, max_windows=None)
    batched = LocalTarget(torch_backend, batch_size=8).rolling_logprobs(text, context=64, stride=40, max_tokens=None, max_windows=None)
    assert len(single.logprobs) == len(batched.logprobs)
    np.testing.assert_allclose(single.logprobs, batched.logprobs, atol=1e-4)


def test_perplexity_limit_caps_windows(torch_backend, tmp_path: Path) -> None:
    task = PerplexityTask(name="ppl", type="perplexity", data=str(CORPUS), context=32, stride=32)
    result = perplexity.run(task, _context(LocalTarget(torch_backend), tmp_path, limit=2))
    assert result.details["windows"] == 2
    assert result.metrics["perplexity"]["samples"] == 31 + 31


# --- multiple choice ---------------------------------------------------------------------


def _lm_eval_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-evaluation-harness's pair encoding and continuation log-likelihood, computed directly."""
    import torch

    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    continuation_ids = whole[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    positions = range(len(context_ids) - 1, ids.size(1) - 1)
    return float(sum(logprobs[p, ids[0, p + 1]] for p in positions))


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_multiple_choice_matches_lm_eval_formulas(torch_backend, hf_model, tmp_path: Path) -> None:
    model, tokenizer = hf_model
    data = _write_jsonl(tmp_path / "mc.jsonl", CHOICE_RECORDS)
    acc, acc_norm = [], []
    for record in CHOICE_RECORDS:
        lls = [_lm_eval_loglikelihood(model, tokenizer, record["ctx"], " " + ending) for ending in record["endings"]]
        lengths = [float(len(ending.encode("utf-8"))) for ending in record["endings"]]
        acc.append(float(np.argmax(lls) == record["label"]))
        acc_norm.append(float(np.argmax(np.array(lls) / np.array(lengths)) == record["label"]))

    from llmctl.eval.suite import MultipleChoiceTask

    task = MultipleChoiceTask(name="mc", type="multiple_choice", data=str(data), format="hellaswag")
    result = multiple_choice.run(task, _context(LocalTarget(torch_backend), tmp_path))
    assert result.metrics["acc"]["value"] == pytest.approx(np.mean(acc))
    assert result.metrics["acc_norm"]["value"] == pytest.approx(np.mean(acc_norm))
    assert result.metrics["acc"]["samples"] == len(CHOICE_RECORDS)
    assert result.metrics["acc"]["stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(len(acc)))


def test_loglikelihoods_match_direct_computation(torch_backend, hf_model) -> None:
    model, tokenizer = hf_model
    requests = [(r["ctx"], " " + e) for r in CHOICE_RECORDS for e in r["endings"]]
    observed = LocalTarget(torch_backend).loglikelihoods(requests)
    expected = [_lm_eval_loglikelihood(model, tokenizer, c, e) for c, e in requests]
    np.testing.assert_allclose(observed, expected, rtol=1e-4, atol=1e-3)


def test_loglikelihoods_batch_size_invariant(torch_backend) -> None:
    requests = [(r["ctx"], " " + e) for r in CHOICE_RECORDS for e in r["endings"]]
    reference = LocalTarget(torch_backend, batch_size=1).loglikelihoods(requests)
    for batch_size in (2, 5, 32):
        batched = LocalTarget(torch_backend, batch_size=batch_size).loglikelihoods(requests)
        np.testing.assert_allclose(batched, reference, atol=1e-4, rtol=0)


def test_trailing_space_moves_to_continuation(torch_backend) -> None:
    target = LocalTarget(torch_backend)
    assert target.encode_pair("The capital of ", "France") == target.encode_pair("The capital of", " France")


def test_acc_norm_divides_by_bytes() -> None:
    example = ChoiceExample("ctx", ["ab", "abcdefgh"], gold=1)
    acc, acc_norm = score_examples([[-3.0, -4.0]], [example])
    assert acc == [0.0]  # -3 beats -4 unnormalized
    assert acc_norm == [1.0]  # -4 / 8 bytes beats -3 / 2 bytes


def test_builtin_formats_read_shared_files(shared_datasets: Path) -> None:
    from llmctl.eval.data import BUILTIN_FORMATS, read_labels

    checks = {
        "hellaswag": ("hellaswag/val.jsonl", 4),
        "arc": ("arc/ARC-Challenge-Test.jsonl", 4),
        "boolq": ("boolq/dev.jsonl", 2),
    }
    for name, (relative, choices) in checks.items():
        record = read_jsonl(shared_datasets / relative)[0]
        example = BUILTIN_FORMATS[name](record)
        assert len(example.choices) == choices, name
        assert 0 <= example.gold < choices, name
    assert BUILTIN_FORMATS["hellaswag"](read_jsonl(shared_datasets / "hellaswag/val.jsonl")[0]).gold == 3
    assert BUILTIN_FORMATS["arc"](read_jsonl(shared_datasets / "arc/ARC-Challenge-Test.jsonl")[0]).gold == 2
    records = read_jsonl(shared_datasets / "piqa/valid.jsonl")
    labels = read_labels(shared_datasets / "piqa/valid-labels.lst", len(records))
    first = Record(records[0].path, records[0].line, dict(records[0].data, label=labels[0]))
    assert BUILTIN_FORMATS["piqa"](first).context.startswith("Question: How do I ready a guinea pig cage")


def test_custom_mapping_reads_nested_fields(tmp_path: Path) -> None:
    record = Record(tmp_path / "x.jsonl", 3, {"q": {"text": "2+2?"}, "options": ["3", "4"], "answer": "B"})
    example = custom_example(record, "Q: {q.text}\nA:", "options", "answer")
    assert example == ChoiceExample("Q: 2+2?\nA:", ["3", "4"], 1)
    by_text = custom_example(Record(record.path, 4, dict(record.data, answer="4")), "{q.text}", "options", "answer")
    assert by_text.gold == 1
    with pytest.raises(InputError, match=r"x\.jsonl:3: missing field 'q.missing'"):
        custom_example(record, "{q.missing}", "options", "answer")


def test_sample_indices_depend_on_seed() -> None:
    assert sample_indices(100, 10, seed=1) == sample_indices(100, 10, seed=1)
    assert sample_indices(100, 10, seed=1) != sample_indices(100, 10, seed=2)
    assert sample_indices(5, 10, seed=1) == [0, 1, 2, 3, 4]
    assert sample_indices(5, None, seed=1) == [0, 1, 2, 3, 4]


# --- parity ------------------------------------------------------------------------------


def test_compare_logits_against_numpy() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(5, 11)).astype(np.float32)
    model = reference + rng.normal(scale=0.3, size=reference.shape).astype(np.float32)
    compared = compare_logits(model, reference)

    p = np.exp(reference) / np.exp(reference).sum(-1, keepdims=True)
    q = np.exp(model) / np.exp(model).sum(-1, keepdims=True)
    np.testing.assert_allclose(compared["kl"], (p * np.log(p / q)).sum(-1), rtol=1e-5)
    np.testing.assert_array_equal(compared["top1"], (model.argmax(-1) == reference.argmax(-1)).astype(float))
    assert compared["max_logit_diff"] == pytest.approx(float(np.abs(model - reference).max()))
    np.testing.assert_allclose(np.exp(log_softmax(model)).sum(-1), 1.0)


def test_parity_of_model_with_itself(torch_backend, tmp_path: Path) -> None:
    from llmctl.eval.suite import ParityTask
    from llmctl.eval.tasks import parity

    target = LocalTarget(torch_backend)
    task = ParityTask(name="parity", type="parity", samples=3, length=16, greedy_tokens=4)
    result = parity.run(task, _context(target, tmp_path, reference=target))
    assert result.metrics["kl_mean"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["top1_agreement"]["value"] == 1.0
    assert result.metrics["greedy_agreement"]["value"] == 1.0
    assert result.metrics["top1_agreement"]["samples"] == 3 * 16


def test_parity_against_other_model(torch_backend, tiny_llama_untied: Path, tmp_path: Path) -> None:
    from llmctl.eval.suite import ParityTask
    from llmctl.eval.tasks import parity
    from llmctl.runtime import open_backend

    other = open_backend(tiny_llama_untied, "torch", threads=1)
    try:
        task = ParityTask(name="parity", type="parity", samples=2, length=12, greedy_tokens=4)
        result = parity.run(task, _context(LocalTarget(torch_backend), tmp_path, reference=LocalTarget(other)))
    finally:
        other.close()
    assert result.metrics["kl_mean"]["value"] > 0.1
    assert result.metrics["max_logit_diff"]["value"] > 0.1
    assert result.metrics["top1_agreement"]["value"] < 1.0


# --- gates -------------------------------------------------------------------------------

KNOWN = ["hellaswag.acc", "hellaswag.acc_norm", "wiki.perplexity", "speed.decode_tps", "other.perplexity"]


def test_gate_parsing() -> None:
    gate = parse_gate("hellaswag.acc >= 0.35", KNOWN)
    assert (gate.metric, gate.op, gate.threshold, gate.bound) == ("hellaswag.acc", ">=", 0.35, "value")
    assert parse_gate("decode_tps>=50", KNOWN).metric == "speed.decode_tps"
    relative = parse_gate("wiki.perplexity <= baseline * 1.05", KNOWN)
    assert (relative.threshold, relative.baseline_op, relative.baseline_operand) == (None, "*", 1.05)
    assert parse_gate("wilson_lower(hellaswag.acc) >= 0.3", KNOWN).bound == "wilson_lower"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("hellaswag.accuracy >= 0.3", "unknown metric 'hellaswag.accuracy'"),
        ("perplexity <= 10", "ambiguous"),
        ("hellaswag.acc => 0.3", "invalid gate"),
        ("wilson_lower(wiki.perplexity) >= 1", "only to proportions"),
        ("hellaswag.acc >= 0.3.1", "invalid number"),
    ],
)
def test_gate_parsing_errors(expression: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_gate(expression, KNOWN)


def test_gate_outcomes() -> None:
    metrics = {
        "hellaswag.acc": {"value": 0.4, "samples": 50},
        "wiki.perplexity": {"value": 10.4, "samples": 1000},
        "speed.decode_tps": {"value": None, "samples": 0, "reason": "skipped: no data"},
    }
    baseline = {"metrics": {"wiki.perplexity": {"value": 10.0}}}
    gates = [parse_gate(e, KNOWN) for e in (
        "hellaswag.acc >= 0.35", "wilson_lower(hellaswag.acc) >= 0.35", "wiki.perplexity <= baseline * 1.05",
        "wiki.perplexity <= baseline + 0.3", "decode_tps >= 50",
    )]
    rows = check_gates(gates, metrics, baseline)
    assert [row["outcome"] for row in rows] == ["pass", "fail", "pass", "fail", "skipped"]
    assert rows[1]["observed"] == pytest.approx(wilson_interval(20, 50)[0])
    assert rows[2]["threshold"] == pytest.approx(10.5)
    assert rows[2]["baseline"] == 10.0
    assert rows[4]["reason"] == "skipped: no data"


def test_relative_gate_needs_baseline() -> None:
    gates = [parse_gate("wiki.perplexity <= baseline * 1.05", KNOWN)]
    with pytest.raises(UsageError, match="--baseline"):
        require_baseline(gates, baseline_given=False)
    require_baseline(gates, baseline_given=True)


def test_wilson_interval_known_values() -> None:
    # 8/10 with z = 1.96: centre 0.7167, half-width 0.2266, worked by hand from the Wilson formula.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
