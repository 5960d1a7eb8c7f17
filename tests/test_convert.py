"""convert on tiny models: both exporters, parity, tied and untied weights, the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from llmctl.artifacts import read_manifest, verify_manifest
from llmctl.convert import convert
from llmctl.convert.onnx_files import weight_bytes
from llmctl.convert.results import checkpoint_fp32_bytes
from llmctl.errors import ParityError
from llmctl.profiles import load_profile
from llmctl.profiles.schema import Tolerance

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def profile():
    return load_profile(None)


@pytest.fixture(scope="session")
def llama_onnx(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> Path:
    out = tmp_path_factory.mktemp("convert") / "tiny-llama-onnx"
    convert(str(tiny_llama), out, profile=profile)
    return out


def _initializer_shapes(folder: Path) -> dict[str, list[int]]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {t.name: list(t.dims) for t in model.graph.initializer}


def test_convert_genai_layout(llama_onnx: Path):
    names = {p.name for p in llama_onnx.iterdir()}
    for expected in ("model.onnx", "model.onnx.data", "genai_config.json", "config.json", "generation_config.json", "tokenizer.json", "llmctl.json"):
        assert expected in names
    assert not any(name.startswith(".") for name in names)


def test_convert_manifest_and_parity(llama_onnx: Path):
    manifest = read_manifest(llama_onnx)
    assert manifest.status == "ok"
    assert manifest.model["runtime"] == "genai"
    assert manifest.model["exporter"] == "genai"
    assert manifest.model["tied_embeddings"] is True
    parity = manifest.steps[0].parity
    assert parity["max_abs_logit_diff"] < 1e-3
    assert parity["top1_agreement"] == 1.0
    assert parity["greedy_agreement"] == 1.0
    assert manifest.source.weights[0].path == "model.safetensors"
    assert verify_manifest(llama_onnx, manifest) == []


def test_convert_tied_stored_once(llama_onnx: Path, tiny_llama: Path):
    shapes = _initializer_shapes(llama_onnx)
    vocab_matrices = [name for name, dims in shapes.items() if sorted(dims) == [64, 384]]
    assert vocab_matrices == ["lm_head.MatMul.weight"]
    assert weight_bytes(llama_onnx) <= 1.05 * checkpoint_fp32_bytes(tiny_llama)


def test_weight_bytes_leaves_out_rotary_tables(llama_onnx: Path):
    model = onnx.load(str(llama_onnx / "model.onnx"), load_external_data=False)
    tables = [t for t in model.graph.initializer if t.name in ("cos_cache", "sin_cache")]
    assert len(tables) == 2
    table_bytes = sum(int(np.prod(t.dims)) * 4 for t in tables)
    assert weight_bytes(llama_onnx, include_buffers=True) - weight_bytes(llama_onnx) == table_bytes


def test_convert_untied_kept_untied(tiny_llama_untied: Path, tmp_path: Path, profile):
    out = tmp_path / "untied"
    convert(str(tiny_llama_untied), out, profile=profile)
    shapes = _initializer_shapes(out)
    assert sum(1 for dims in shapes.values() if sorted(dims) == [64, 384]) == 2
    assert read_manifest(out).model["tied_embeddings"] is False


def test_convert_explicit_head_dim(tiny_llama_head_dim: Path, tmp_path: Path, profile):
    result = convert(str(tiny_llama_head_dim), tmp_path / "head-dim", profile=profile)
    assert result.summary["parity"]["top1_agreement"] == 1.0
    genai = json.loads((result.path / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["head_size"] == 32


def test_convert_optimum_ties_weights(tiny_llama: Path, tmp_path: Path, profile):
    result = convert(str(tiny_llama), tmp_path / "optimum", profile=profile, exporter="optimum")
    assert result.manifest.model["runtime"] == "ort"
    assert result.summary["parity"]["greedy_agreement"] == 1.0
    sizes = result.summary["sizes"]
    assert sizes["onnx_weight_bytes"] <= 1.05 * sizes["checkpoint_fp32_bytes"]


def test_convert_gemma3_falls_back_to_optimum(tiny_gemma3: Path, tmp_path: Path, profile):
    # The fixture's layer pattern differs from the one the GenAI builder hard-codes.
    result = convert(str(tiny_gemma3), tmp_path / "gemma3", profile=profile)
    assert result.summary["exporter"] == "optimum"
    assert result.summary["parity"]["passed"]


def test_convert_parity_failure_leaves_nothing(tiny_llama: Path, tmp_path: Path, profile):
    strict = profile.model_copy(deep=True)
    strict.recipe.convert_tolerance = Tolerance(max_abs_logit_diff=1e-9)
    out = tmp_path / "strict"
    with pytest.raises(ParityError, match="max abs logit diff"):
        convert(str(tiny_llama), out, profile=strict)
    assert list(tmp_path.iterdir()) == []


def test_convert_keep_failed_marks_artifact(tiny_llama: Path, tmp_path: Path, profile):
    strict = profile.model_copy(deep=True)
    strict.recipe.convert_tolerance = Tolerance(max_abs_logit_diff=1e-9)
    result = convert(str(tiny_llama), tmp_path / "kept", profile=strict, keep_failed=True)
    assert result.summary["status"] == "parity-failed"
    assert read_manifest(result.path).status == "parity-failed"
