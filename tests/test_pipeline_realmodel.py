"""The pipeline on SmolLM2-135M-Instruct: two variants with the quick suite.

The default profile gates on top-1 agreement with the fp32 model (>= 0.7): int8 weight-only
agrees on about 0.95 of next tokens and passes, int4 RTN on about 0.6 and is rejected, so the
selection is decided by quality even though int4 is smaller and cheaper.
"""

from __future__ import annotations

import json

import pytest

from llmctl.pipeline.run import run_pipeline
from llmctl.profiles import load_profile

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


def test_smollm2_two_variants_quick_suite(smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    result = run_pipeline(smollm2_gguf, out, profile=load_profile("cpu-x86-avx2"), variants=["int4-b32", "int8-weight-only"])

    by_name = {variant.name: variant for variant in result.variants}
    assert sorted(by_name) == ["int4-b32", "int8-weight-only"]
    for variant in by_name.values():
        assert variant.error is None, variant.error
        assert variant.metrics["top1_agreement"] is not None
        assert variant.metrics["decode_tps"] > 0
        assert (out / "variants" / variant.name / "llmctl.json").is_file()
    assert by_name["int4-b32"].size_bytes < by_name["int8-weight-only"].size_bytes
    assert by_name["int4-b32"].metrics["perplexity"] is not None or by_name["int4-b32"].metrics["accuracy_mean"] is None

    assert by_name["int8-weight-only"].metrics["top1_agreement"] >= 0.7
    assert by_name["int4-b32"].metrics["top1_agreement"] < 0.7
    assert result.selected == "int8-weight-only"
    assert (out / "selected").resolve() == (out / "variants" / result.selected).resolve()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["selected"] == result.selected
    assert (out / "report.html").stat().st_size > 10_000

    again = run_pipeline(smollm2_gguf, out, profile=load_profile("cpu-x86-avx2"), variants=["int4-b32", "int8-weight-only"])
    assert {record.status for record in again.steps} == {"cached"}
