"""GGUF block types: decoders against gguf's dequantizer, MatMulNBits products, reading files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmctl.errors import InputError
from llmctl.gguf import blocks, names
from llmctl.gguf.reader import read_gguf
from tests import gguf_files

SIMPLE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]
ROWS, COLUMNS = 48, 512


def _raw_blocks(type_name: str, seed: int = 0) -> np.ndarray:
    if type_name in K_TYPES:
        return gguf_files.random_k_blocks(type_name, ROWS, COLUMNS, seed=seed)
    matrix = np.random.default_rng(seed).standard_normal((ROWS, COLUMNS)).astype(np.float32)
    return gguf_files.quantize(matrix, type_name)


def _write_matrix_gguf(path: Path, type_name: str, raw: np.ndarray) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _matmul_model(weight: blocks.BlockWeight, accuracy_level: int):
    """Build a model with the transcoder's MatMulNBits (and offset branch) for ``weight``."""
    import onnx
    from onnx import TensorProto, helper

    from llmctl.gguf.transcode import _Graph

    n, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Identity", ["A"], ["A2"], name="anchor")],
        "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    editor = _Graph(model)
    editor._anchor = 0
    editor.matmul_nbits("A2", "Y", "w.MatMul.weight", weight, accuracy_level)
    editor.finish()
    onnx.checker.check_model(model)
    return model


def _matmul_nbits(weight: blocks.BlockWeight, activation: np.ndarray, accuracy_level: int) -> np.ndarray:
    """Run the transcoder's MatMulNBits (with its offset branch) on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    model = _matmul_model(weight, accuracy_level)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": activation})[0]


@pytest.mark.parametrize("type_name", SIMPLE_TYPES + K_TYPES)
def test_decode_matches_gguf_dequantize(type_name: str) -> None:
    from gguf import GGMLQuantizationType, quants

    raw = _raw_blocks(type_name)
    expected = quants.dequantize(raw, GGMLQuantizationType[type_name])
    weight = blocks.decode(type_name, raw)
    assert weight.codes.max() < (1 << weight.bits)
    np.testing.assert_allclose(weight.dequantize(), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("type_name", SIMPLE_TYPES + K_TYPES)
@pytest.mark.parametrize("accuracy_level", [0, 1])
def test_matmul_nbits_equals_dequantized_product(tmp_path: Path, type_name: str, accuracy_level: int) -> None:
    from gguf import GGMLQuantizationType, quants

    path = _write_matrix_gguf(tmp_path / f"{type_name}.gguf", type_name, _raw_blocks(type_name, seed=1))
    tensor = read_gguf(path).tensors["blk.0.ffn_up.weight"]
    assert tensor.type_name == type_name
    assert tensor.shape == (ROWS, COLUMNS)

    activation = np.random.default_rng(2).standard_normal((1, 3, COLUMNS)).astype(np.float32)
    expected = activation @ quants.dequantize(tensor.data, GGMLQuantizationType[type_name]).T
    product = _matmul_nbits(blocks.decode(type_name, tensor.data), activation, accuracy_level)
    relative = np.abs(product - expected).max() / np.abs(expected).max()
    assert relative < 1e-5


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1"])
def test_five_bit_codes_unpack_to_codes(type_name: str) -> None:
    weight = blocks.decode(type_name, _raw_blocks(type_name))
    assert weight.five_bit is not None
    unpacked = weight.five_bit.unpack().reshape(weight.shape) + np.uint8(weight.five_bit.shift)
    np.testing.assert_array_equal(unpacked, weight.codes)


@pytest.mark.parametrize("type_name", K_TYPES)
def test_k_quant_factors_equal_scales(type_name: str) -> None:
    from llmctl.gguf.transcode import _factors_exact

    weight = blocks.decode(type_name, _raw_blocks(type_name))
    assert _factors_exact(weight.scale_factors, weight.scales)
    if weight.offsets is not None:
        assert _factors_exact(weight.offset_factors, weight.offsets)


# GGUF sizes in bits per value: Q5_0 5.5, Q8_0 8.5, Q4_K 4.5, Q6_K 6.5625. The graph stores
# K-quant sub-block factors as whole bytes (Q4_K: 4.625) and Q6_K codes as 8-bit codes.
@pytest.mark.parametrize(("type_name", "max_bits_per_value"), [("Q5_0", 5.6), ("Q8_0", 8.6), ("Q4_K", 4.7), ("Q6_K", 8.7)])
def test_graph_stores_gguf_size(type_name: str, max_bits_per_value: float) -> None:
    model = _matmul_model(blocks.decode(type_name, _raw_blocks(type_name)), 0)
    stored = sum(len(tensor.raw_data) for tensor in model.graph.initializer)
    assert stored * 8 / (ROWS * COLUMNS) <= max_bits_per_value


def test_8bit_weight_runs_as_4bit_node() -> None:
    model = _matmul_model(blocks.decode("Q8_0", _raw_blocks("Q8_0")), 0)
    nodes = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert len(nodes) == 1
    attributes = {attribute.name: attribute.i for attribute in nodes[0].attribute}
    assert attributes["bits"] == 4
    assert attributes["K"] == 2 * COLUMNS


def test_rotary_caches_recovered() -> None:
    import torch

    from llmctl.gguf.transcode import _rotary_inverse_frequencies

    dim, length = 64, 512
    inverse = 1.0 / (1_000_000.0 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inverse)
    cos, sin = torch.cos(angles).numpy(), torch.sin(angles).numpy()
    np.testing.assert_array_equal(_rotary_inverse_frequencies(cos, sin), inverse.numpy())
    scaled = cos * np.float32(1.5)
    assert _rotary_inverse_frequencies(scaled, sin) is None


def test_affine_zero_scale_block_is_exact() -> None:
    matrix = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    matrix[1, :32] = 0.75  # a constant block quantizes to d == 0 and m == 0.75
    raw = gguf_files.quantize(matrix, "Q4_1")
    weight = blocks.decode("Q4_1", raw)
    assert weight.dequantize()[1, :32] == pytest.approx(np.full(32, 0.75))


def test_pack_codes_4bit_low_nibble_first() -> None:
    codes = np.tile(np.arange(16, dtype=np.uint8), (1, 2))
    weight = blocks.BlockWeight("Q4_0", 4, 32, codes, np.ones((1, 1), np.float32), None)
    packed = blocks.pack_codes(weight)
    assert packed.shape == (1, 1, 16)
    assert packed[0, 0, 0] == 0x10
    assert packed[0, 0, 15] == 0xFE


def test_row_order_inverts_llama_permutation() -> None:
    rows = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    permuted = gguf_files._permute(rows, 4)
    order = names.row_order(names.ARCHITECTURES["llama"], "blk.0.attn_q.weight", 32, 4, 2)
    np.testing.assert_array_equal(permuted[order], rows)


def test_row_order_none_for_gemma3() -> None:
    assert names.row_order(names.ARCHITECTURES["gemma3"], "blk.0.attn_q.weight", 32, 4, 1) is None


def test_component_keys() -> None:
    assert names.component_key("blk.3.attn_q.weight") == "layers.3.attn.q_proj"
    assert names.component_key("token_embd.weight") == "embed_tokens"
    assert names.component_key("blk.3.attn_norm.weight") is None
    assert names.unpack_key("layers.2.attn.qkv_proj") == ["layers.2.attn.q_proj", "layers.2.attn.k_proj", "layers.2.attn.v_proj"]
    assert names.builder_weight_key("lm_head.MatMul.weight") == "lm_head"


def test_read_truncated_gguf(tmp_path: Path) -> None:
    path = _write_matrix_gguf(tmp_path / "full.gguf", "Q8_0", _raw_blocks("Q8_0"))
    truncated = tmp_path / "truncated.gguf"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match="truncated"):
        read_gguf(truncated)


def test_read_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(InputError, match="not a GGUF file"):
        read_gguf(path)


def test_read_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")
