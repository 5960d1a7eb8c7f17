"""``llmctl generate`` through the CLI, and a real generation from SmolLM2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli.main import app

pytestmark = pytest.mark.slow


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_generate_streams_text(runner: CliRunner, tiny_llama_genai: Path) -> None:
    result = runner.invoke(app, ["generate", str(tiny_llama_genai), "The quick brown fox", "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "genai: " in result.stderr
    assert "12 generated tokens" in result.stderr
    assert "finish reason length" in result.stderr


def test_generate_json_matches_streamed_text(runner: CliRunner, tiny_llama_ort: Path) -> None:
    args = ["generate", str(tiny_llama_ort), "The quick brown fox", "-n", "10", "--seed", "3", "-t", "0.8"]
    streamed = runner.invoke(app, args)
    as_json = runner.invoke(app, [*args, "--json"])
    assert streamed.exit_code == 0, streamed.output
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["backend"] == "ort"
    assert data["usage"]["completion_tokens"] == 10
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 10
    assert data["finish_reason"] == "length"
    assert streamed.stdout == data["text"] + "\n"


def test_generate_backends_agree_greedy(runner: CliRunner, tiny_llama: Path, tiny_llama_genai: Path, tiny_llama_ort: Path) -> None:
    texts = {}
    for name, folder in (("torch", tiny_llama), ("genai", tiny_llama_genai), ("ort", tiny_llama_ort)):
        result = runner.invoke(app, ["generate", str(folder), "hello", "--chat", "-n", "16", "--json", "--backend", name])
        assert result.exit_code == 0, result.output
        texts[name] = json.loads(result.stdout)["text"]
    assert texts["genai"] == texts["torch"]
    assert texts["ort"] == texts["torch"]


def test_generate_stop_string_not_printed(runner: CliRunner, tiny_llama_ort: Path) -> None:
    base = runner.invoke(app, ["generate", str(tiny_llama_ort), "The quick", "-n", "20", "--json"])
    text = json.loads(base.stdout)["text"]
    stop = text[5:8]
    result = runner.invoke(app, ["generate", str(tiny_llama_ort), "The quick", "-n", "20", "--json", "--stop", stop])
    data = json.loads(result.stdout)
    assert data["text"] == text[: text.find(stop)]
    assert data["finish_reason"] == "stop"


def test_generate_prompt_from_stdin(runner: CliRunner, tiny_llama_ort: Path) -> None:
    direct = runner.invoke(app, ["generate", str(tiny_llama_ort), "The quick", "-n", "5", "--json"])
    piped = runner.invoke(app, ["generate", str(tiny_llama_ort), "-", "-n", "5", "--json"], input="The quick")
    assert json.loads(piped.stdout)["text"] == json.loads(direct.stdout)["text"]


def test_generate_missing_model(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", str(tmp_path / "absent"), "hi"])
    assert result.exit_code == 2
    assert "model folder not found" in result.stderr
    assert "Traceback" not in result.output


def test_generate_chat_without_template(runner: CliRunner, tiny_llama_ort: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_llama_ort, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["generate", str(folder), "hi", "--chat"])
    assert result.exit_code == 2
    assert "no chat template" in result.stderr


def test_generate_backend_mismatch(runner: CliRunner, tiny_llama_ort: Path) -> None:
    result = runner.invoke(app, ["generate", str(tiny_llama_ort), "hi", "--backend", "genai"])
    assert result.exit_code == 2
    assert "genai_config.json" in result.stderr
    assert "--backend ort" in result.stderr


def test_generate_rejects_bad_values(runner: CliRunner, tiny_llama_ort: Path) -> None:
    assert runner.invoke(app, ["generate", str(tiny_llama_ort), "hi", "--max-tokens", "0"]).exit_code == 2
    assert runner.invoke(app, ["generate", str(tiny_llama_ort), "hi", "--temperature", "-1"]).exit_code == 2
    top_p = runner.invoke(app, ["generate", str(tiny_llama_ort), "hi", "--top-p", "0"])
    assert top_p.exit_code == 2
    assert "--top-p" in top_p.stderr


def test_generate_unknown_profile(runner: CliRunner, tiny_llama_ort: Path) -> None:
    result = runner.invoke(app, ["generate", str(tiny_llama_ort), "hi", "--profile", "no-such-profile"])
    assert result.exit_code == 2


@pytest.mark.realmodel
def test_generate_smollm2_answers_paris(runner: CliRunner, smollm2_genai_fp32: Path) -> None:
    result = runner.invoke(
        app, ["generate", str(smollm2_genai_fp32), "What is the capital of France?", "--chat", "-n", "24", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "genai"
    assert "Paris" in data["text"]


def test_generate_seed_past_32_bits(runner: CliRunner, tiny_llama_genai: Path) -> None:
    args = ["generate", str(tiny_llama_genai), "hi", "-n", "4", "--temperature", "1", "--json"]
    first = runner.invoke(app, [*args, "--seed", str(2**32 + 5)])
    second = runner.invoke(app, [*args, "--seed", str(2**32 + 5)])

    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["text"] == json.loads(second.stdout)["text"]


@pytest.mark.parametrize("seed", [str(2**63), "-1"])
def test_generate_seed_out_of_range(runner: CliRunner, tiny_llama_genai: Path, seed: str) -> None:
    result = runner.invoke(app, ["generate", str(tiny_llama_genai), "hi", "--seed", seed])

    assert result.exit_code == 2
    assert "--seed" in result.output
    assert "Traceback" not in result.output


def test_generate_threads_above_cpu_count(runner: CliRunner, tiny_llama_genai: Path) -> None:
    result = runner.invoke(app, ["generate", str(tiny_llama_genai), "hi", "--threads", "100000"])

    assert result.exit_code == 2
    assert "--threads 100000" in result.stderr
    assert "CPU cores" in result.stderr


def test_generate_gguf_file_hints_convert(runner: CliRunner, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    result = runner.invoke(app, ["generate", str(gguf), "hi"])

    assert result.exit_code == 2
    assert "llmctl convert" in result.stderr


def test_generate_gpu_profile_on_cpu_build(runner: CliRunner, tiny_llama_genai: Path) -> None:
    import onnxruntime_genai as og

    if og.is_cuda_available():
        pytest.skip("this onnxruntime-genai build has CUDA")
    result = runner.invoke(app, ["generate", str(tiny_llama_genai), "hi", "--profile", "gpu-nvidia-l4"])

    assert result.exit_code == 2
    assert "'cuda' is not available" in result.stderr
    assert "--profile cpu-x86-avx2" in result.stderr
