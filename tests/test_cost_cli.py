"""``llmctl cost-estimate`` through the CLI: tables, JSON, calibration and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli.main import app
from tests.test_cost import GEMMA3_270M, LLAMA3_8B, SMOLLM2_135M, eval_results, write_config

runner = CliRunner()
HEAVY_MODULES = ("torch", "transformers", "onnxruntime", "onnxruntime_genai", "optimum")


@pytest.fixture
def smollm2(tmp_path: Path) -> Path:
    return write_config(tmp_path / "SmolLM2-135M", SMOLLM2_135M)


def invoke(*args: str):
    return runner.invoke(app, ["cost-estimate", *args])


def test_cli_json_has_figures_and_assumptions(smollm2):
    result = invoke(str(smollm2), "--profile", "gpu-nvidia-t4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["total_params"] == 134_515_008
    row = report["rows"][0]
    for key in ("ttft_ms", "tpot_ms", "tokens_per_second_per_stream", "tokens_per_second_per_instance",
                "usd_per_hour", "usd_per_month", "usd_per_million_input_tokens", "usd_per_million_output_tokens",
                "usd_per_million_tokens", "memory_needed_gb", "max_batch", "instances"):
        assert row[key] is not None, key
    assumptions = row["assumptions"]
    assert assumptions["price"]["source"].startswith("computeprices.com")
    assert assumptions["efficiency"]["decode_bandwidth"] > 0
    assert assumptions["runtime_overhead_gb"] > 0


def test_cli_config_json_file_accepted(smollm2):
    result = invoke(str(smollm2 / "config.json"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"][0]["profile"] == "cpu-x86-avx2"


def test_cli_all_profiles_sorted_and_cheapest_named(smollm2):
    result = invoke(str(smollm2), "--all-profiles", "--requests-per-second", "5", "--min-tokens-per-second", "20",
                    "--json")
    report = json.loads(result.stdout)
    costs = [row["usd_per_million_tokens"] for row in report["rows"] if row["usd_per_million_tokens"] is not None]
    assert costs == sorted(costs)
    assert len(report["rows"]) >= 7
    assert report["cheapest"] == report["rows"][0]["profile"]


def test_cli_table_marks_rows(tmp_path):
    model = write_config(tmp_path / "llama3", LLAMA3_8B)
    result = invoke(str(model), "-p", "gpu-nvidia-t4", "-p", "gpu-nvidia-h100-80gb", "--quant", "fp16")
    assert result.exit_code == 0, result.output
    assert "cheapest" in result.stdout
    assert "does not fit" in result.stdout
    assert "gpu-nvidia-t4" in result.stdout


def test_cli_fits_no_profile_says_by_how_much(tmp_path):
    model = write_config(tmp_path / "big", {**LLAMA3_8B, "num_hidden_layers": 320})
    result = invoke(str(model), "-p", "gpu-nvidia-t4", "-p", "gpu-nvidia-l4", "--quant", "fp16")
    assert result.exit_code == 0
    assert "fits no chosen profile" in result.stdout
    assert "short by" in result.stdout


def test_cli_gemma3_sliding_window(tmp_path):
    model = write_config(tmp_path / "gemma", GEMMA3_270M)
    result = invoke(str(model), "--context", "8192", "--kv-cache-dtype", "fp16", "--json")
    row = json.loads(result.stdout)["rows"][0]
    assert row["kv_bytes_per_sequence"] == 33_030_144


def test_cli_missing_field_named(tmp_path):
    model = write_config(tmp_path / "broken", {k: v for k, v in SMOLLM2_135M.items() if k != "vocab_size"})
    result = invoke(str(model))
    assert result.exit_code == 2
    assert "vocab_size" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("option", ["--prompt-tokens", "--output-tokens", "--concurrency", "--tokens-per-day"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_cli_rejects_impossible_workload(smollm2, option, value):
    result = invoke(str(smollm2), option, value)
    assert result.exit_code == 2
    assert option in result.stderr


def test_cli_rejects_two_load_measures(smollm2):
    result = invoke(str(smollm2), "--concurrency", "2", "--requests-per-second", "1")
    assert result.exit_code == 2
    assert "exclude each other" in result.stderr


def test_cli_unknown_quant(smollm2):
    result = invoke(str(smollm2), "--quant", "int3")
    assert result.exit_code == 2
    assert "int3" in result.stderr


def test_cli_missing_price_flag_supplies_it(smollm2):
    without = json.loads(invoke(str(smollm2), "--json").stdout)["rows"][0]
    assert any("--price-per-hour" in problem for problem in without["problems"])
    with_price = json.loads(invoke(str(smollm2), "--price-per-hour", "0.17", "--json").stdout)["rows"][0]
    assert with_price["usd_per_hour"] == pytest.approx(0.17)


def test_cli_profile_without_bandwidth_named(smollm2, tmp_path):
    text = (Path(__file__).resolve().parents[1] / "profiles" / "cpu-x86-avx2.yaml").read_text(encoding="utf-8")
    profile = tmp_path / "no-bandwidth.yaml"
    profile.write_text(text.replace("memory_bandwidth_gbps: 51.2", ""), encoding="utf-8")
    result = invoke(str(smollm2), "--profile", str(profile))
    assert result.exit_code == 2
    assert "hardware.memory_bandwidth_gbps" in result.stderr


def test_cli_model_path_not_found(tmp_path):
    result = invoke(str(tmp_path / "nothing" / "config.json"))
    assert result.exit_code == 2
    assert "not found" in result.stderr


def test_cli_calibration_side_by_side(smollm2, tmp_path):
    results = eval_results(tmp_path / "results.json", "cpu-x86-avx2", 120.0, 900.0)
    result = invoke(str(smollm2), "--calibrate", str(results), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)["calibrations"][0]
    assert record["measured"]["decode_tps"] == 120.0
    assert record["estimate_after"]["decode_tps"] == pytest.approx(120.0, rel=0.01)
    table = invoke(str(smollm2), "--calibrate", str(results))
    assert "calibration of cpu-x86-avx2" in table.stdout


def test_cli_calibration_unknown_profile(smollm2, tmp_path):
    results = eval_results(tmp_path / "results.json", "somewhere-else", 120.0, 900.0)
    result = invoke(str(smollm2), "--calibrate", str(results))
    assert result.exit_code == 2
    assert "somewhere-else" in result.stderr


def test_cli_gguf_metadata(smollm2_gguf):
    result = invoke(str(smollm2_gguf), "--json")
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["total_params"] == 134_515_008
    assert model["kv_bytes_per_token_fp16"] == 23_040


def test_cost_path_imports_no_heavy_modules(smollm2):
    """The cost command answers from the config alone: no torch, transformers or ONNX Runtime."""
    code = (
        "import sys, typer\n"
        "from typer.testing import CliRunner\n"
        "import llmctl.cli.cost as cost\n"
        "app = typer.Typer()\n"
        "app.command()(cost.cost_estimate)\n"
        f"result = CliRunner().invoke(app, [{str(smollm2)!r}, '--all-profiles', '--json'])\n"
        "assert result.exit_code == 0, result.output\n"
        f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


# --- each profile keeps its own workload ------------------------------------------------------


def rows_by_profile(result) -> dict:
    assert result.exit_code == 0, result.output
    return {row["profile"]: row for row in json.loads(result.stdout)["rows"]}


def test_cli_row_independent_of_other_profiles(smollm2):
    alone = rows_by_profile(invoke(str(smollm2), "-p", "gpu-nvidia-t4", "--json"))["gpu-nvidia-t4"]
    after_cpu = rows_by_profile(invoke(str(smollm2), "-p", "cpu-x86-avx2", "-p", "gpu-nvidia-t4", "--json"))
    before_cpu = rows_by_profile(invoke(str(smollm2), "-p", "gpu-nvidia-t4", "-p", "cpu-x86-avx2", "--json"))
    cpu_alone = rows_by_profile(invoke(str(smollm2), "-p", "cpu-x86-avx2", "--json"))["cpu-x86-avx2"]
    assert after_cpu["gpu-nvidia-t4"] == alone
    assert before_cpu["cpu-x86-avx2"] == cpu_alone
    assert alone["workload"]["kv_cache_dtype"] == "fp16"
    assert cpu_alone["workload"]["kv_cache_dtype"] == "fp32"


def test_cli_option_overrides_every_profile(smollm2):
    rows = rows_by_profile(invoke(str(smollm2), "-p", "cpu-x86-avx2", "-p", "gpu-nvidia-t4",
                                  "--kv-cache-dtype", "int8", "--prompt-tokens", "100", "--json"))
    assert {row["workload"]["kv_cache_dtype"] for row in rows.values()} == {"int8"}
    assert {row["workload"]["prompt_tokens"] for row in rows.values()} == {100}


def test_cli_workload_names_varying_settings(smollm2):
    result = invoke(str(smollm2), "-p", "cpu-x86-avx2", "-p", "gpu-nvidia-t4", "--json")
    workload = json.loads(result.stdout)["workload"]
    assert workload["varies_by_profile"] == ["kv_cache_dtype"]
    assert workload["kv_cache_dtype"] == {"gpu-nvidia-t4": "fp16", "cpu-x86-avx2": "fp32"}
    assert workload["prompt_tokens"] == 512


def test_cli_table_shows_each_rows_kv_dtype(smollm2):
    result = invoke(str(smollm2), "-p", "cpu-x86-avx2", "-p", "gpu-nvidia-t4")
    assert result.exit_code == 0, result.output
    assert "KV fp16 x 640" in result.stdout
    assert "KV fp32 x 640" in result.stdout
    assert "23,040 in fp16, 46,080 in fp32" in result.stdout


def test_cli_header_kv_dtype_matches_workload(smollm2):
    result = invoke(str(smollm2))  # the default profile keeps its KV cache in fp32
    assert "46,080 in fp32" in result.stdout
    assert "KV cache fp32 x 640 tokens per stream" in result.stdout
    assert "fp16" not in result.stdout


def test_cli_all_profiles_with_builtin_profile_noted(smollm2):
    result = invoke(str(smollm2), "--all-profiles", "-p", "gpu-nvidia-t4", "--json")
    notes = json.loads(result.stdout)["notes"]
    assert any("already includes gpu-nvidia-t4" in note for note in notes)


# --- tables -----------------------------------------------------------------------------------


def test_cli_table_whole_when_piped(smollm2):
    result = invoke(str(smollm2), "--all-profiles", "--quant", "int4", "--max-ttft-ms", "500")
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    for name in ("gpu-nvidia-a100-80gb", "gpu-nvidia-h100-80gb", "cpu-x86-avx512-vnni-c7i"):
        assert name in result.stdout


# --- bad numbers and notes --------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--requests-per-second", "--tokens-per-day", "--max-ttft-ms",
                                    "--min-tokens-per-second", "--price-per-hour"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_cli_rejects_non_finite(smollm2, option, value):
    result = invoke(str(smollm2), option, value)
    assert result.exit_code == 2, result.output
    assert option in result.stderr
    assert "finite" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("option", ["--max-ttft-ms", "--min-tokens-per-second"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_rejects_non_positive_target(smollm2, option, value):
    result = invoke(str(smollm2), option, value)
    assert result.exit_code == 2, result.output
    assert f"{option} must be greater than 0" in result.stderr


def test_cli_no_targets_note_names_price(smollm2):
    result = invoke(str(smollm2))
    assert result.exit_code == 0, result.output
    assert "targets" not in result.stdout
    assert "no chosen profile that fits has a price" in result.stdout


def test_cli_missed_target_note(smollm2):
    result = invoke(str(smollm2), "--max-ttft-ms", "0.001", "--price-per-hour", "1")
    assert "no priced profile meets the targets" in result.stdout


def test_cli_warns_past_context_length(tmp_path):
    model = write_config(tmp_path / "smol", {**SMOLLM2_135M, "max_position_embeddings": 8192})
    result = invoke(str(model), "--output-tokens", "10000")
    assert result.exit_code == 0, result.output
    assert "10,512 tokens per stream exceed the model's context length of 8,192" in result.stderr
    within = invoke(str(model))
    assert "context length" not in within.stderr


def test_cli_bad_config_value_has_hint(tmp_path):
    model = write_config(tmp_path / "bad", {**SMOLLM2_135M, "hidden_size": "big"})
    result = invoke(str(model))
    assert result.exit_code == 2
    assert "hidden_size must be a positive integer" in result.stderr
    assert "hint:" in result.stderr


# --- hub ids ----------------------------------------------------------------------------------


def test_cli_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("nosuchorg/nosuchmodel")
    assert result.exit_code == 2
    assert "HF_HUB_OFFLINE" in result.stderr
    assert "Retrying" not in result.output


@pytest.fixture
def closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hub_unreachable_fails_without_retries(monkeypatch, closed_port):
    from huggingface_hub import constants

    from llmctl.cost.model_config import load_model_config
    from llmctl.errors import InputError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(InputError) as error:
        load_model_config("nosuchorg/nosuchmodel")
    assert f"127.0.0.1:{closed_port} cannot be reached" in error.value.message
    assert "HF_HUB_OFFLINE=1" in error.value.hint


def test_hub_id_read_from_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from llmctl.cost.model_config import load_model_config

    snapshot = tmp_path / "models--someone--smol" / "snapshots" / "abc123"
    write_config(snapshot, SMOLLM2_135M)
    (tmp_path / "models--someone--smol" / "refs").mkdir()
    (tmp_path / "models--someone--smol" / "refs" / "main").write_text("abc123", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    config = load_model_config("someone/smol")
    assert config.values["hidden_size"] == 576
    assert config.name == "smol"


def test_cli_cheapest_line_mentions_targets_only_when_set(smollm2):
    plain = invoke(str(smollm2), "-p", "gpu-nvidia-t4")
    assert "cheapest profile that fits: gpu-nvidia-t4" in plain.stdout
    targeted = invoke(str(smollm2), "-p", "gpu-nvidia-t4", "--max-ttft-ms", "500")
    assert "cheapest profile meeting the targets: gpu-nvidia-t4" in targeted.stdout
