"""Units of the pipeline: cache keys, narrowing, selection rules, the step cache, the resolver."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmctl.errors import InputError, UsageError
from llmctl.pipeline import resolve_model_dir
from llmctl.pipeline.cache import StepCache, locked
from llmctl.pipeline.outcome import summarize_metrics
from llmctl.pipeline.plan import build_plan, step_key
from llmctl.pipeline.select import select_variant
from llmctl.profiles import load_profile
from llmctl.profiles.schema import Quantization, Variant

VERSIONS = {"llmctl": "0.1.0", "onnxruntime": "1.0"}


def _profile(**recipe_updates):
    profile = load_profile("cpu-x86-avx2")
    variants = [
        Variant(name="fp32"),
        Variant(name="int4-b32", quantization=Quantization(method="int4", block_size=32)),
        Variant(name="int8-dynamic", quantization=Quantization(method="int8", mode="dynamic")),
    ]
    recipe = profile.recipe.model_copy(update={"variants": variants, **recipe_updates})
    return profile.model_copy(update={"recipe": recipe})


def _plan(profile=None, *, variants=None, select=None, source_digest="a" * 64, versions=VERSIONS):
    return build_plan(
        Path("/models/tiny"), source_digest, Path("/tmp/out"), profile=profile or _profile(), suite="quick",
        suite_file=Path("/suites/quick.yaml"), suite_digest="s" * 64, data_digests={}, versions=versions,
        variants=variants, select=select,
    )


def _keys(plan):
    return {step.label: step.key for step in plan.steps()}


def test_step_key_depends_on_every_part():
    base = step_key("quantize", {"block": 32}, ["in"], VERSIONS)
    assert step_key("quantize", {"block": 32}, ["in"], VERSIONS) == base
    assert step_key("quantize", {"block": 64}, ["in"], VERSIONS) != base
    assert step_key("quantize", {"block": 32}, ["other"], VERSIONS) != base
    assert step_key("quantize", {"block": 32}, ["in"], {**VERSIONS, "onnxruntime": "2.0"}) != base
    assert step_key("eval", {"block": 32}, ["in"], VERSIONS) != base


def test_plan_steps_and_order():
    plan = _plan()
    labels = [step.label for step in plan.steps()]
    assert labels == ["convert", "quantize int4-b32", "quantize int8-dynamic", "eval fp32", "eval int4-b32", "eval int8-dynamic"]
    fp32 = plan.variants[0]
    assert fp32.build is plan.convert
    assert fp32.precision == "fp32"
    assert plan.variants[1].precision == "int4"


def test_plan_changed_quantization_rebuilds_only_that_variant():
    before = _keys(_plan())
    changed = _profile(variants=[
        Variant(name="fp32"),
        Variant(name="int4-b32", quantization=Quantization(method="int4", block_size=64)),
        Variant(name="int8-dynamic", quantization=Quantization(method="int8", mode="dynamic")),
    ])
    after = _keys(_plan(changed))
    differing = sorted(label for label in before if before[label] != after[label])
    assert differing == ["eval int4-b32", "quantize int4-b32"]


def test_plan_changed_source_rebuilds_everything():
    before = _keys(_plan())
    after = _keys(_plan(source_digest="b" * 64))
    assert all(before[label] != after[label] for label in before)


def test_plan_changed_tool_version_rebuilds_everything():
    before = _keys(_plan())
    after = _keys(_plan(versions={**VERSIONS, "onnxruntime": "9.9"}))
    assert all(before[label] != after[label] for label in before)


def test_plan_variants_narrowing_keeps_profile_order():
    plan = _plan(variants=["int8-dynamic", "fp32"])
    assert [v.name for v in plan.variants] == ["fp32", "int8-dynamic"]


def test_plan_unknown_variant_rejected():
    with pytest.raises(UsageError, match="unknown variant 'int3'") as raised:
        _plan(variants=["int3"])
    assert "int4-b32" in raised.value.hint


def test_plan_empty_variants_rejected():
    with pytest.raises(UsageError, match="--variants is empty"):
        _plan(variants=[" ", ""])


def test_plan_unknown_select_rule_rejected():
    with pytest.raises(UsageError, match="unknown selection rule 'random'"):
        _plan(select="random")


def test_plan_without_variants_uses_recipe_quantization():
    profile = load_profile("cpu-x86-avx2")
    profile = profile.model_copy(update={"recipe": profile.recipe.model_copy(update={"variants": []})})
    plan = _plan(profile)
    assert [v.name for v in plan.variants] == [profile.recipe.quantization.method]


@dataclass
class FakeCandidate:
    name: str
    passed: bool
    size_bytes: int
    metrics: dict = field(default_factory=dict)
    usd_per_million_tokens: float | None = None
    estimated_tokens_per_second: float | None = None


CANDIDATES = [
    FakeCandidate("fp32", True, 500, {"kl_mean": 0.0, "decode_tps": 20.0}, 3.0, 10.0),
    FakeCandidate("int8", True, 200, {"kl_mean": 0.01, "decode_tps": 40.0}, 1.5, 20.0),
    FakeCandidate("int4", True, 100, {"kl_mean": 0.05, "decode_tps": 35.0}, 1.0, 30.0),
    FakeCandidate("int4-tiny", False, 50, {"kl_mean": 0.9, "decode_tps": 90.0}, 0.5, 60.0),
]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("cheapest", "int4"), ("smallest", "int4"), ("fastest", "int8"), ("best-quality", "fp32")],
)
def test_select_rule_picks_among_passing(rule, expected):
    assert select_variant(CANDIDATES, rule).name == expected


def test_select_cheapest_without_price_uses_estimated_throughput():
    unpriced = [FakeCandidate(c.name, c.passed, c.size_bytes, c.metrics, None, c.estimated_tokens_per_second) for c in CANDIDATES]
    unpriced[1].estimated_tokens_per_second = 45.0
    assert select_variant(unpriced, "cheapest").name == "int8"


def test_select_none_passing_returns_none():
    failing = [FakeCandidate("a", False, 1), FakeCandidate("b", False, 2)]
    assert select_variant(failing, "smallest") is None


def test_cache_marker_and_leftovers(tmp_path):
    cache = StepCache(tmp_path / "cache")
    step = _plan().convert
    assert not cache.is_done(step)

    entry = cache.prepare(step)
    leftover = entry / ".output.tmp-123-456"
    leftover.mkdir()
    cache.output(step).mkdir()
    assert not cache.is_done(step)  # output without a marker does not count

    cache.prepare(step)
    assert not leftover.exists()
    assert not cache.output(step).exists()

    cache.output(step).mkdir()
    cache.complete(step, {"duration_s": 1.0})
    assert cache.is_done(step)
    assert cache.marker(step)["duration_s"] == 1.0


def test_cache_marker_with_other_key_ignored(tmp_path):
    cache = StepCache(tmp_path / "cache")
    step = _plan().convert
    cache.prepare(step)
    cache.output(step).mkdir()
    cache.complete(step, {})
    (cache.entry(step) / "step.json").write_text('{"key": "something else"}', encoding="utf-8")
    assert not cache.is_done(step)


def test_cache_content_hash_memo(tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    cache = StepCache(tmp_path / "cache")
    first = cache.content_hash(source)
    assert (tmp_path / "cache" / "hashes.json").is_file()
    assert StepCache(tmp_path / "cache").content_hash(source) == first

    source.write_bytes(b"other weights")
    assert cache.content_hash(source) != first


def test_cache_content_hash_without_persist(tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    StepCache(tmp_path / "cache", persist=False).content_hash(source)
    assert not (tmp_path / "cache").exists()


def test_cache_lock_rejects_second_run(tmp_path):
    with locked(tmp_path):
        with pytest.raises(UsageError, match="another pipeline run"):
            with locked(tmp_path):
                pass


def test_resolve_model_dir_plain_folder(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path


def test_resolve_model_dir_selected_link(tmp_path):
    artifact = tmp_path / "cache" / "quantize-1" / "output"
    artifact.mkdir(parents=True)
    (tmp_path / "variants").mkdir()
    os.symlink("../cache/quantize-1/output", tmp_path / "variants" / "int4")
    os.symlink("variants/int4", tmp_path / "selected")
    assert resolve_model_dir(tmp_path) == artifact.resolve()


def test_resolve_model_dir_pointer_file(tmp_path):
    (tmp_path / "variants" / "int8").mkdir(parents=True)
    (tmp_path / "selected").write_text("int8\n", encoding="utf-8")
    assert resolve_model_dir(tmp_path) == (tmp_path / "variants" / "int8").resolve()


def test_resolve_model_dir_nothing_selected(tmp_path):
    (tmp_path / "variants").mkdir()
    (tmp_path / "report.json").write_text("{}", encoding="utf-8")
    with pytest.raises(InputError, match="no selected variant"):
        resolve_model_dir(tmp_path)


def test_summarize_metrics_picks_figures():
    metrics = {
        "parity.kl_mean": {"value": 0.02},
        "parity.top1_agreement": {"value": 0.97},
        "wiki.perplexity": {"value": 12.5},
        "hellaswag.acc": {"value": 0.4},
        "hellaswag.acc_norm": {"value": 0.5},
        "arc.acc": {"value": 0.2},
        "speed.decode_tps": {"value": 80.0},
        "speed.ttft_ms": {"value": None},
    }
    summary, tasks = summarize_metrics(metrics)
    assert summary["kl_mean"] == 0.02
    assert summary["perplexity"] == 12.5
    assert summary["decode_tps"] == 80.0
    assert summary["ttft_ms"] is None
    assert summary["accuracy_mean"] == pytest.approx(0.3)
    assert tasks["hellaswag.acc_norm"] == 0.5
    assert "parity.kl_mean" not in tasks
