"""convert, quantize and info through the CLI: results, and every bad input as a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llmctl.cli.main import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _assert_clean_failure(result, exit_code: int, fragment: str, parent: Path) -> None:
    assert result.exit_code == exit_code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not [p for p in parent.iterdir() if p.name.startswith(".") or p.name == "out"]


@pytest.fixture(scope="module")
def converted(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "onnx"
    result = _run("convert", tiny_llama, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return out


def test_convert_cli_json(converted: Path):
    manifest = json.loads((converted / "llmctl.json").read_text())
    assert manifest["status"] == "ok"
    assert manifest["model"]["exporter"] == "genai"


def test_convert_cli_existing_output_needs_force(tiny_llama: Path, converted: Path):
    result = _run("convert", tiny_llama, "-o", converted)
    assert result.exit_code == 2
    assert "--force" in result.output


def test_quantize_cli_int4(converted: Path, tmp_path: Path):
    profile = tmp_path / "loose.yaml"
    profile.write_text(
        "name: loose\ndescription: test\nhardware: {kind: cpu, name: t, arch: x86_64, cores: 2, memory_gb: 4, "
        "memory_bandwidth_gbps: 10, peak_tflops: {fp32: 0.1}}\nrecipe: {quantize_tolerance: {min_top1_agreement: 0.1}}\n"
    )
    result = _run("quantize", converted, "-o", tmp_path / "int4", "--method", "int4", "--block-size", "32", "--profile", profile, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["shared_embedding"] is True
    assert summary["sizes"]["after_folder_bytes"] < summary["sizes"]["before_folder_bytes"]


def test_info_shows_manifest(converted: Path):
    result = _run("info", converted)
    assert result.exit_code == 0
    assert "LlamaForCausalLM" in result.output
    assert "step convert" in result.output


def test_info_verify_detects_change(converted: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    assert _run("info", copy, "--verify").exit_code == 0
    with open(copy / "tokenizer_config.json", "a") as handle:
        handle.write(" ")
    result = _run("info", copy, "--verify", "--json")
    assert result.exit_code == 1
    assert "tokenizer_config.json" in result.output


def test_info_missing_manifest(tmp_path: Path):
    result = _run("info", tmp_path)
    assert result.exit_code == 2
    assert "llmctl.json" in result.output


def test_bad_missing_path(tmp_path: Path):
    _assert_clean_failure(_run("convert", tmp_path / "nope", "-o", tmp_path / "out"), 2, "path not found", tmp_path)


def test_bad_folder_without_config(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(_run("convert", tmp_path / "empty", "-o", tmp_path / "out"), 2, "no config.json", tmp_path)


def test_bad_unsupported_architecture(tiny_llama: Path, tmp_path: Path):
    folder = tmp_path / "foo"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["FooForCausalLM"], model_type="foo")
    (folder / "config.json").write_text(json.dumps(config))
    result = _run("convert", folder, "-o", tmp_path / "out")
    _assert_clean_failure(result, 2, "FooForCausalLM", tmp_path)
    assert "LlamaForCausalLM" in result.output
    assert "whisper" not in result.output
    assert len(result.output) < 1000


def test_bad_corrupt_gguf(tmp_path: Path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    _assert_clean_failure(_run("convert", tmp_path / "bad.gguf", "-o", tmp_path / "out"), 2, "not a GGUF file", tmp_path)


def test_bad_truncated_gguf(tmp_path: Path):
    import gguf

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    _assert_clean_failure(_run("convert", path, "-o", tmp_path / "out"), 2, "GGUF file", tmp_path)


def test_bad_truncated_safetensors(tiny_llama: Path, tmp_path: Path):
    folder = tmp_path / "cut"
    shutil.copytree(tiny_llama, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _assert_clean_failure(_run("convert", folder, "-o", tmp_path / "out"), 2, "truncated safetensors", tmp_path)


def test_bad_output_is_file(tiny_llama: Path, tmp_path: Path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = _run("convert", tiny_llama, "-o", target)
    assert result.exit_code == 2
    assert "is a file" in result.output
    assert target.read_text() == "x"


def test_bad_method_int3(converted: Path, tmp_path: Path):
    _assert_clean_failure(_run("quantize", converted, "-o", tmp_path / "out", "--method", "int3"), 2, "int3", tmp_path)


@pytest.mark.parametrize("block_size", ["24", "8", "0", "512", "2048"])
def test_bad_block_size(converted: Path, tmp_path: Path, block_size: str):
    result = _run("quantize", converted, "-o", tmp_path / "out", "--block-size", block_size)
    _assert_clean_failure(result, 2, "16..256", tmp_path)


def test_bad_per_channel_with_int4(converted: Path, tmp_path: Path):
    result = _run("quantize", converted, "-o", tmp_path / "out", "--method", "int4", "--per-channel")
    _assert_clean_failure(result, 2, "int8 dynamic", tmp_path)


def test_bad_profile_typo(tiny_llama: Path, tmp_path: Path):
    profile = tmp_path / "typo.yaml"
    profile.write_text(
        "name: typo\ndescription: test\nhardware: {kind: cpu, name: t, arch: x86_64, cores: 2, memory_gb: 4, "
        "memory_bandwidth_gbps: 10, peak_tflops: {fp32: 0.1}}\nrecipe: {exporterr: genai}\n"
    )
    result = _run("convert", tiny_llama, "-o", tmp_path / "out", "--profile", profile)
    _assert_clean_failure(result, 2, "recipe.exporterr", tmp_path)


def test_bad_exporter_genai_unsupported(tiny_gemma3: Path, tmp_path: Path):
    result = _run("convert", tiny_gemma3, "-o", tmp_path / "out", "--exporter", "genai")
    _assert_clean_failure(result, 2, "GenAI model builder", tmp_path)


def test_bad_hub_id_offline(tmp_path: Path):
    result = _run("convert", "someone/not-cached-model", "-o", tmp_path / "out")
    _assert_clean_failure(result, 2, "local Hugging Face cache", tmp_path)
    assert "folder path" in result.output


def test_output_empty_keeps_current_folder(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("precious")
    result = _run("convert", tiny_llama, "-o", "", "--force", "--no-validate")
    assert result.exit_code == 2, result.output
    assert "current folder" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_output_equal_to_input_keeps_source(tiny_llama: Path, tmp_path: Path):
    source = tmp_path / "tiny"
    shutil.copytree(tiny_llama, source)
    result = _run("convert", source, "-o", source, "--force")
    assert result.exit_code == 2, result.output
    assert "is the input" in result.output
    assert "--force" not in result.output
    assert (source / "model.safetensors").is_file()


def test_output_parent_of_input_keeps_files(tiny_llama: Path, tmp_path: Path):
    parent = tmp_path / "par"
    shutil.copytree(tiny_llama, parent / "src")
    (parent / "important.txt").write_text("keep")
    result = _run("convert", parent / "src", "-o", parent, "--force", "--no-validate")
    assert result.exit_code == 2, result.output
    assert "contains the input" in result.output
    assert (parent / "important.txt").read_text() == "keep"


def test_force_rejects_unrelated_folder(tiny_llama: Path, tmp_path: Path):
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "notes.txt").write_text("precious")
    result = _run("convert", tiny_llama, "-o", docs, "--force", "--no-validate")
    assert result.exit_code == 2, result.output
    assert "not an llmctl artifact folder" in result.output
    assert (docs / "notes.txt").read_text() == "precious"


def test_quantize_output_equal_to_input(converted: Path):
    before = (converted / "llmctl.json").read_text()
    result = _run("quantize", converted, "-o", converted, "--method", "int8", "--force")
    assert result.exit_code == 2, result.output
    assert "is the input" in result.output
    assert (converted / "llmctl.json").read_text() == before


def test_debug_keeps_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLMCTL_DEBUG", "1")
    result = _run("convert", tmp_path / "nope", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "path not found" in result.output


def test_fp16_on_cpu_profile_rejected(tiny_llama: Path, tmp_path: Path):
    result = _run("convert", tiny_llama, "-o", tmp_path / "out", "--dtype", "fp16")
    _assert_clean_failure(result, 2, "CPU execution provider", tmp_path)
    assert "--dtype fp32" in result.output


def test_gpu_profile_without_cuda_rejected(tiny_llama: Path, tmp_path: Path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine offers CUDA")
    result = _run("convert", tiny_llama, "-o", tmp_path / "out", "--profile", "gpu-nvidia-l4")
    _assert_clean_failure(result, 2, "gpu-nvidia-l4", tmp_path)
    assert "CUDAExecutionProvider" in result.output
    assert "--dtype fp32" in result.output


def test_no_validate_marks_not_validated(tiny_llama: Path, tmp_path: Path):
    result = _run("convert", tiny_llama, "-o", tmp_path / "out", "--no-validate", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["status"] == "not-validated"
    assert summary["sizes"]["folder_bytes"] == summary["folder_bytes"]
    assert json.loads((tmp_path / "out" / "llmctl.json").read_text())["status"] == "not-validated"


def test_quantize_hides_library_logs(converted: Path, tmp_path: Path):
    arguments = ("quantize", converted, "--method", "int8", "--mode", "dynamic", "--no-validate")
    quiet = _run(*arguments, "-o", tmp_path / "quiet")
    assert quiet.exit_code == 0, quiet.output
    assert "pre-processing" not in quiet.output
    verbose = _run("-vv", *arguments, "-o", tmp_path / "verbose")
    assert verbose.exit_code == 0, verbose.output
    assert "pre-processing" in verbose.output


def test_encoder_converts_but_cannot_generate(tiny_llama: Path, tmp_path: Path):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    config = BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama / name).is_file():
            shutil.copy(tiny_llama / name, bert / name)
    converted = _run("convert", bert, "-o", tmp_path / "bert-onnx", "--json")
    assert converted.exit_code == 0, converted.output
    assert "feature-extraction only" in converted.output

    result = _run("generate", tmp_path / "bert-onnx", "hello", "--max-tokens", "4")
    assert result.exit_code == 2, result.output
    assert "cannot generate text" in result.output
    assert "Traceback" not in result.output


def test_info_accepts_manifest_file(converted: Path):
    result = _run("info", converted / "llmctl.json")
    assert result.exit_code == 0, result.output
    assert "step convert" in result.output


def test_info_verify_detects_manifest_edit(converted: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    manifest = copy / "llmctl.json"
    manifest.write_text(manifest.read_text().replace('"status": "ok"', '"status": "parity-failed"'))
    result = _run("info", copy, "--verify")
    assert result.exit_code == 1
    assert "llmctl.json: edited after it was written" in result.output


def test_profile_error_names_environment(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLMCTL_PROFILE", "bogus")
    result = _run("convert", tiny_llama, "-o", tmp_path / "out")
    _assert_clean_failure(result, 2, "$LLMCTL_PROFILE", tmp_path)


def test_quantize_truncated_external_data(converted: Path, tmp_path: Path):
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    data = damaged / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:3000])
    result = _run("quantize", damaged, "-o", tmp_path / "out", "--method", "int4")
    assert result.exit_code == 2, result.output
    assert "cannot load the ONNX model" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_bad_config_without_architecture(tiny_llama: Path, tmp_path: Path):
    folder = tmp_path / "empty-config"
    shutil.copytree(tiny_llama, folder)
    (folder / "config.json").write_text("{}")
    result = _run("convert", folder, "-o", tmp_path / "out")
    _assert_clean_failure(result, 2, "no architectures or model_type", tmp_path)
