"""The quick suite on SmolLM2-135M-Instruct quantized to int4, with gates the model passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmctl.cli.main import app
from llmctl.profiles import load_profile

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_genai_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmctl.profiles import load_profile
    from llmctl.quantize import quantize

    out = tmp_path_factory.mktemp("smollm2-int4") / "artifact"
    quantize(smollm2_genai_fp32, out, profile=load_profile(None), method="int4", validate=False)
    return out


def test_quick_suite_on_smollm2_int4(smollm2_int4: Path, smollm2_genai_fp32: Path, shared_datasets: Path, tmp_path: Path) -> None:
    gates = [
        # Measured on this artifact: perplexity about 42, HellaSwag acc_norm 0.4 on 20
        # questions, top-1 agreement about 0.6; the gates leave room for run-to-run noise.
        "wikitext2.perplexity <= 80",
        "hellaswag.acc_norm >= 0.25",
        "parity.top1_agreement >= 0.4",
        "decode_tps >= 2",
    ]
    # The default profile also gates on top-1 agreement >= 0.7, which int4 RTN misses on this
    # model by design (the pipeline then prefers int8); this test checks int4 against its own gates.
    profile = load_profile(None).model_copy(deep=True)
    profile.eval.gates = []
    profile_file = tmp_path / "profile.yaml"
    profile_file.write_text(yaml.safe_dump(profile.model_dump(mode="json")), encoding="utf-8")
    args = [
        "eval", str(smollm2_int4), "--suite", "quick", "--reference", str(smollm2_genai_fp32),
        "--profile", str(profile_file), "-o", str(tmp_path / "r.json"),
    ]
    for gate in gates:
        args += ["--gate", gate]
    result = CliRunner().invoke(app, args, env={"LLMCTL_DATASETS": str(shared_datasets)})
    assert result.exit_code == 0, result.output

    document = json.loads((tmp_path / "r.json").read_text())
    assert document["target"]["kind"] == "artifact"
    assert document["target"]["backend"] == "genai"
    assert [task["status"] for task in document["tasks"]] == ["ok"] * 4
    assert document["metrics"]["wikitext2.perplexity"]["samples"] == 2047
    assert document["metrics"]["hellaswag.acc"]["samples"] == 20
    assert [gate["outcome"] for gate in document["gates"]] == ["pass"] * 4
