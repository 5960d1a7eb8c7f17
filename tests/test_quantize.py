"""quantize on tiny models: int4 and int8, the tied head and embedding, parity and sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmctl.artifacts import read_manifest
from llmctl.convert import convert
from llmctl.errors import InputError, ParityError, UsageError
from llmctl.profiles import load_profile
from llmctl.profiles.schema import Tolerance
from llmctl.quantize import quantize, resolve_settings
from llmctl.quantize.methods import QuantizeSettings, WeightOnlyQuantizer, block_quantize_rows

# The tiny random models are far more sensitive to weight noise than trained ones, so the
# quantized-parity tests check the mechanics with a tolerance that only a broken graph fails.
LOOSE = Tolerance(min_top1_agreement=0.1)


@pytest.fixture(scope="session")
def profile():
    loaded = load_profile(None).model_copy(deep=True)
    loaded.recipe.quantize_tolerance = LOOSE
    return loaded


@pytest.fixture(scope="session")
def llama_onnx(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, profile) -> Path:
    out = tmp_path_factory.mktemp("quantize-input") / "tiny-llama-onnx"
    convert(str(tiny_llama), out, profile=profile)
    return out


@pytest.fixture(scope="session")
def llama_int4(llama_onnx: Path, tmp_path_factory: pytest.TempPathFactory, profile):
    return quantize(llama_onnx, tmp_path_factory.mktemp("int4") / "tiny-llama-int4", profile=profile, method="int4")


def _ops(folder: Path) -> list[str]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_block_quantized_matches_numpy(bits: int, symmetric: bool):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(10, 64)).astype(np.float32)
    data, scales, zero_points = block_quantize_rows(weight, bits, 32, symmetric)
    inputs = ["data", "ids", "scales"] + (["zp"] if zero_points is not None else [])
    node = helper.make_node("GatherBlockQuantized", inputs, ["out"], domain="com.microsoft", bits=bits, block_size=32, gather_axis=0, quantize_axis=1)
    initializers = [numpy_helper.from_array(data, "data"), numpy_helper.from_array(scales, "scales")]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points, "zp"))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"ids": np.array([0, 4, 9], dtype=np.int64)})[0]
    error = np.abs(rows - weight[[0, 4, 9]]).max()
    step = np.abs(weight).max() / ((1 << (bits - 1)) - 1)
    assert error <= step


def _tied_graph(vocab: int = 48, hidden: int = 64) -> tuple[onnx.ModelProto, np.ndarray]:
    """A graph shaped like the GenAI builder's tied layout: Gather(Transpose(W)) and MatMul(x, W)."""
    weight = np.random.default_rng(1).normal(size=(hidden, vocab)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["lm_head.MatMul.weight"], ["embedding"], perm=[1, 0], name="/model/embed_tokens/Transpose"),
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["embedded", "lm_head.MatMul.weight"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", vocab]), helper.make_tensor_value_info("embedded", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "lm_head.MatMul.weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), weight


@pytest.mark.parametrize("method,symmetric", [("int4", True), ("int4", False), ("int8", True)])
def test_tied_head_and_embedding_share_tensor(method: str, symmetric: bool):
    import onnxruntime as ort

    model, weight = _tied_graph()
    quantized, report = WeightOnlyQuantizer().quantize_model(model, QuantizeSettings(method=method, symmetric=symmetric, accuracy_level=0))
    assert report.shared_embedding
    assert report.float_tensors == []
    assert "lm_head.MatMul.weight" not in {t.name for t in quantized.graph.initializer}

    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, 47]], dtype=np.int64)
    logits, embedded = session.run(None, {"input_ids": ids})
    step = np.abs(weight).max() / (7 if method == "int4" else 127)
    assert np.abs(embedded[0] - weight.T[[0, 7, 47]]).max() <= step
    expected = weight.T[[0, 7, 47]] @ weight
    assert np.abs(logits[0] - expected).max() < 0.1 * np.abs(expected).max()


def test_int4_quantizes_head_and_embedding(llama_int4):
    summary = llama_int4.summary
    assert summary["shared_embedding"] is True
    assert summary["head"] == "int4 MatMulNBits"
    assert summary["embedding"].startswith("int4 GatherBlockQuantized")
    assert [t["name"] for t in summary["float_tensors"]] == ["cos_cache", "sin_cache"]
    ops = _ops(llama_int4.path)
    assert "GatherBlockQuantized" in ops
    assert "MatMul" not in ops


def test_int4_sizes_and_parity_recorded(llama_int4):
    sizes = llama_int4.summary["sizes"]
    assert sizes["after_weight_bytes"] < 0.25 * sizes["before_weight_bytes"]
    manifest = read_manifest(llama_int4.path)
    assert [step.name for step in manifest.steps] == ["convert", "quantize"]
    assert manifest.steps[1].parity["positions"] > 0
    assert manifest.model["quantization"] == "int4"


def test_int4_keeps_genai_config(llama_int4):
    config = json.loads((llama_int4.path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert (llama_int4.path / config["model"]["decoder"]["filename"]).is_file()


def test_int4_untied_embedding(tiny_llama_untied: Path, tmp_path: Path, profile):
    converted = convert(str(tiny_llama_untied), tmp_path / "onnx", profile=profile)
    result = quantize(converted.path, tmp_path / "int4", profile=profile, method="int4", symmetric=False)
    assert result.summary["shared_embedding"] is False
    assert result.summary["embedding"] == "int4 GatherBlockQuantized"
    assert result.summary["head"] == "int4 MatMulNBits"


def test_int4_hqq_float_zero_points_not_shared(llama_onnx: Path, tmp_path: Path, profile):
    result = quantize(llama_onnx, tmp_path / "hqq", profile=profile, method="int4", algorithm="hqq")
    assert result.summary["status"] == "ok"
    assert result.summary["shared_embedding"] is False
    assert result.summary["embedding"] == "int4 GatherBlockQuantized"


def test_int8_weight_only_parity(llama_onnx: Path, tmp_path: Path):
    result = quantize(llama_onnx, tmp_path / "int8", profile=load_profile(None), method="int8", accuracy_level=1)
    assert result.summary["status"] == "ok"
    assert result.summary["parity"]["top1_agreement"] >= 0.8
    assert result.summary["head"] == "int8 MatMulNBits"


def test_int8_dynamic_per_channel(llama_onnx: Path, tmp_path: Path, profile):
    result = quantize(llama_onnx, tmp_path / "dyn", profile=profile, method="int8", mode="dynamic", per_channel=True)
    assert result.summary["quantized_nodes"] > 0
    assert result.summary["embedding"] == "int8 GatherBlockQuantized"
    assert "GatherBlockQuantized" in _ops(result.path)
    parameters = read_manifest(result.path).steps[-1].parameters
    assert parameters["per_channel"] is True
    assert "accuracy_level" not in parameters


def test_quantize_parity_failure_leaves_nothing(llama_onnx: Path, tmp_path: Path):
    strict = load_profile(None).model_copy(deep=True)
    strict.recipe.quantize_tolerance = Tolerance(max_abs_logit_diff=1e-9)
    with pytest.raises(ParityError, match="max abs logit diff"):
        quantize(llama_onnx, tmp_path / "q", profile=strict)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options", [{"method": "int3"}, {"block_size": 24}, {"block_size": 8}, {"accuracy_level": 7}, {"method": "int4", "mode": "dynamic"}])
def test_resolve_settings_rejects(options):
    with pytest.raises(UsageError):
        resolve_settings(load_profile(None), **options)


@pytest.mark.parametrize("block_size", [512, 2048])
def test_resolve_settings_rejects_large_block(block_size):
    with pytest.raises(UsageError, match="16..256"):
        resolve_settings(load_profile(None), block_size=block_size)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"method": "int4", "per_channel": True}, "--per-channel"),
        ({"method": "int8", "mode": "weight-only", "per_channel": False}, "--per-channel"),
        ({"method": "int8", "mode": "dynamic", "accuracy_level": 4}, "--accuracy-level"),
        ({"method": "int8", "mode": "dynamic", "algorithm": "rtn"}, "--algorithm"),
    ],
)
def test_resolve_settings_rejects_inapplicable(options, option):
    with pytest.raises(UsageError, match=option):
        resolve_settings(load_profile(None), **options)


def test_settings_parameters_dynamic_only_effective():
    settings = resolve_settings(load_profile(None), method="int8", mode="dynamic", per_channel=True)
    parameters = settings.parameters()
    assert parameters["per_channel"] is True
    assert "accuracy_level" not in parameters
    assert "algorithm" not in parameters


def test_settings_parameters_int4_has_no_per_channel():
    parameters = resolve_settings(load_profile(None), method="int4").parameters()
    assert "per_channel" not in parameters
    assert parameters["block_size"] == 32


def test_quantize_rejects_quantized_artifact(llama_int4, tmp_path: Path, profile):
    with pytest.raises(InputError, match=r"already quantized \(int4 weight-only"):
        quantize(llama_int4.path, tmp_path / "again", profile=profile, method="int8", mode="dynamic")
    assert list(tmp_path.iterdir()) == []


def test_quantize_rejects_quantized_graph_without_manifest(llama_int4, tmp_path: Path, profile):
    import shutil

    copy = tmp_path / "bare"
    shutil.copytree(llama_int4.path, copy)
    (copy / "llmctl.json").unlink()
    with pytest.raises(InputError, match="MatMulNBits"):
        quantize(copy, tmp_path / "again", profile=profile, method="int4")


def test_resolve_settings_profile_defaults():
    settings = resolve_settings(load_profile(None))
    assert (settings.method, settings.block_size, settings.symmetric, settings.accuracy_level) == ("int4", 32, True, 4)
