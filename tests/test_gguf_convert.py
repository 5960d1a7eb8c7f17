"""Converting GGUF files with their quantization kept: tiny Llama end to end, bad inputs, SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmctl.errors import InputError, UnsupportedError
from tests import gguf_files

pytestmark = pytest.mark.slow

# Mixed block types, as Q4_K_M-style files mix them: the packed query/key/value weight gets
# 4-bit (Q4_1, Q4_0) and 8-bit (Q8_0) parts, the MLP a 5-bit type with and without minimums.
MIXED_TYPES = {
    "attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q8_0",
    "ffn_gate": "Q4_0", "ffn_up": "Q5_0", "ffn_down": "Q5_1", "token_embd": "Q8_0",
}


def _profile():
    from llmctl.profiles.loader import load_profile

    return load_profile(None)


def _convert(source: Path, out: Path, **options):
    from llmctl.convert import convert

    return convert(str(source), out, profile=_profile(), **options)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gguf")
    return gguf_files.write_llama_gguf(tiny_llama, folder / "tiny-llama.gguf", MIXED_TYPES)


@pytest.fixture(scope="session")
def tiny_gguf_artifact(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    return _convert(tiny_gguf, tmp_path_factory.mktemp("tiny-gguf-onnx") / "out")


def _reference_logits(gguf_path: Path, token_ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def _genai_logits(folder: Path, token_ids: list[int]) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(token_ids) + 8)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(token_ids, dtype=np.int32))
    return np.array(generator.get_output("logits"))[0]


def test_tiny_llama_logits_equal_dequantized(tiny_gguf: Path, tiny_gguf_artifact) -> None:
    token_ids = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]
    expected = _reference_logits(tiny_gguf, token_ids)
    logits = _genai_logits(tiny_gguf_artifact.path, token_ids)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < 1e-3 * np.abs(expected).max()
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


def test_tiny_llama_graph_has_no_float_matmul(tiny_gguf_artifact) -> None:
    import onnx

    graph = onnx.load(str(tiny_gguf_artifact.path / "model.onnx"), load_external_data=False).graph
    op_types = [node.op_type for node in graph.node]
    weights = {tensor.name for tensor in graph.initializer}
    assert op_types.count("MatMulNBits") >= 2 * 6 + 1
    assert "GatherBlockQuantized" in op_types
    assert not any(node.op_type == "MatMul" and node.input[1] in weights and node.input[1].endswith("MatMul.weight") for node in graph.node)


def test_tiny_llama_manifest_records_tensors(tiny_gguf_artifact) -> None:
    manifest = json.loads((tiny_gguf_artifact.path / "llmctl.json").read_text())
    step = manifest["steps"][0]
    records = {record["gguf_tensor"]: record for record in step["gguf_tensors"]}
    assert records["blk.0.attn_q.weight"]["gguf_type"] == "Q4_1"
    assert records["blk.0.attn_q.weight"]["became"] == "MatMulNBits 4-bit block 32, uint8 zero points, block offsets"
    assert "block offsets" in records["blk.1.ffn_down.weight"]["became"]
    assert records["blk.1.ffn_down.weight"]["became"].endswith("stored as 5-bit codes")
    assert records["blk.0.ffn_up.weight"]["became"] == "MatMulNBits 8-bit block 32 (run as 4-bit halves), stored as 5-bit codes"
    assert records["blk.0.attn_v.weight"]["became"] == "MatMulNBits 8-bit block 32 (run as 4-bit halves)"
    assert records["token_embd.weight"]["became"] == "GatherBlockQuantized 8-bit block 32"
    assert manifest["model"]["dtype"] == "gguf"
    assert tiny_gguf_artifact.summary["gguf"]["requantized"] == []
    assert tiny_gguf_artifact.summary["gguf"]["computed_at_load"] == ["cos_cache", "sin_cache"]
    assert tiny_gguf_artifact.summary["parity"]["passed"]


def test_head_accuracy_level_4(tiny_gguf: Path, tmp_path: Path) -> None:
    from llmctl.gguf.transcode import transcode

    folder = _convert(tiny_gguf, tmp_path / "fp32", dtype="fp32", exporter="genai", validate=False).path
    report = transcode(folder, tiny_gguf, head_accuracy_level=4)
    heads = [record for record in report.tensors if record.onnx_weight == "lm_head.MatMul.weight"]
    assert [record.became for record in heads] == ["MatMulNBits 8-bit block 32, accuracy level 4"]
    assert report.to_dict()["head_accuracy_level"] == 4

    token_ids = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]
    expected = _reference_logits(tiny_gguf, token_ids)
    logits = _genai_logits(folder, token_ids)
    # The head's input is quantized to int8 blocks, so the logits are close but not equal.
    assert np.abs(logits - expected).max() < 5e-2 * np.abs(expected).max()


def test_untied_head_and_float_embedding(tiny_llama_untied: Path, tmp_path: Path) -> None:
    types = {"token_embd": "Q4_1", "output": "Q4_0"}
    gguf_path = gguf_files.write_llama_gguf(tiny_llama_untied, tmp_path / "untied.gguf", types, default_type="Q4_0")
    result = _convert(gguf_path, tmp_path / "out")
    records = {record.gguf_tensor: record for record in _records(result)}
    assert records["output.weight"].became == "MatMulNBits 4-bit block 32"
    assert records["token_embd.weight"].became.startswith("Gather float32")

    token_ids = [1, 2, 3, 40, 50, 60]
    expected = _reference_logits(gguf_path, token_ids)
    logits = _genai_logits(result.path, token_ids)
    assert np.abs(logits - expected).max() < 1e-3 * np.abs(expected).max()


def _records(result):
    from llmctl.gguf.transcode import TensorRecord

    return [TensorRecord(**record) for record in result.manifest.steps[0].model_extra["gguf_tensors"]]


def test_dtype_option_dequantizes(tiny_gguf: Path, tmp_path: Path) -> None:
    result = _convert(tiny_gguf, tmp_path / "out", dtype="fp32", validate=False)
    assert "gguf" not in result.summary
    assert result.summary["dtype"] == "fp32"


def test_truncated_gguf_rejected(tiny_gguf: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    data = tiny_gguf.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="truncated"):
        _convert(truncated, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [truncated]


def test_unsupported_block_type_rejected(tiny_llama: Path, tmp_path: Path) -> None:
    gguf_path = _write_with_iq4_nl(tiny_llama, tmp_path / "iq4.gguf")
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match="IQ4_NL") as raised:
        _convert(gguf_path, out)
    assert "blk.0.ffn_down.weight" in str(raised.value)
    assert "--gguf-fallback requantize" in str(raised.value)
    assert not out.exists()


def test_unsupported_block_type_requantized(tiny_llama: Path, tmp_path: Path) -> None:
    gguf_path = _write_with_iq4_nl(tiny_llama, tmp_path / "iq4.gguf")
    result = _convert(gguf_path, tmp_path / "out", gguf_fallback="requantize", validate=False)
    assert set(result.summary["gguf"]["requantized"]) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    records = {record.gguf_tensor: record for record in _records(result)}
    assert records["blk.0.ffn_down.weight"].became.startswith("requantized to Q8_0")
    assert records["blk.0.attn_q.weight"].became == "MatMulNBits 8-bit block 32 (run as 4-bit halves)"


def test_unmapped_architecture_rejected(tiny_llama: Path, tmp_path: Path) -> None:
    gguf_path = gguf_files.write_llama_gguf(tiny_llama, tmp_path / "other.gguf", {}, architecture="falcon")
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match="'falcon' has no tensor-name mapping"):
        _convert(gguf_path, out)
    assert not out.exists()


def _cli(*args) -> object:
    from typer.testing import CliRunner

    from llmctl.cli.main import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_cli_gguf_fallback_requantize(tiny_llama: Path, tmp_path: Path) -> None:
    gguf_path = _write_with_iq4_nl(tiny_llama, tmp_path / "iq4.gguf")
    result = _cli("convert", gguf_path, "-o", tmp_path / "out", "--gguf-fallback", "requantize", "--no-validate", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["gguf"]["fallback"] == "requantize"
    assert set(summary["gguf"]["requantized"]) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}


def test_cli_gguf_fallback_default_rejects(tiny_llama: Path, tmp_path: Path) -> None:
    gguf_path = _write_with_iq4_nl(tiny_llama, tmp_path / "iq4.gguf")
    result = _cli("convert", gguf_path, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "IQ4_NL" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_gguf_fallback_unknown_value(tiny_gguf: Path, tmp_path: Path) -> None:
    result = _cli("convert", tiny_gguf, "-o", tmp_path / "out", "--gguf-fallback", "dequantize")
    assert result.exit_code == 2, result.output
    assert "unknown GGUF fallback 'dequantize'" in result.output
    assert not (tmp_path / "out").exists()


def _write_with_iq4_nl(folder: Path, path: Path) -> Path:
    """Write the tiny Llama with its down projections as IQ4_NL, a type with a lookup table."""
    import gguf

    gguf_files.write_llama_gguf(folder, path, {})
    reader = gguf.GGUFReader(path)
    # Rewrite through a second writer: copy every tensor, swapping the down projections' type.
    rewritten = path.with_name("rewritten-" + path.name)
    writer = gguf.GGUFWriter(str(rewritten), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        if tensor.name.endswith("ffn_down.weight"):
            rows = int(tensor.shape[1])
            blocks = rng.integers(0, 256, size=(rows, int(tensor.shape[0]) // 32, 18), dtype=np.uint8)
            blocks[..., 0:2] = np.full((rows, blocks.shape[1]), 0.01, dtype=np.float16)[..., None].view(np.uint8)
            writer.add_tensor(tensor.name, blocks.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    rewritten.replace(path)
    return path


@pytest.mark.realmodel
def test_smollm2_gguf_answers_paris(smollm2_gguf: Path, tmp_path: Path) -> None:
    from llmctl.runtime import open_backend
    from llmctl.runtime.base import SamplingParams

    result = _convert(smollm2_gguf, tmp_path / "smollm2", validate=False)
    assert result.summary["gguf"]["requantized"] == []
    assert result.summary["sizes"]["folder_bytes"] <= 1.1 * smollm2_gguf.stat().st_size

    backend = open_backend(result.path, "genai")
    try:
        prompt = backend.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        steps = list(backend.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0)))
        text = backend.decode([step.token_id for step in steps])
    finally:
        backend.close()
    assert "Paris" in text
