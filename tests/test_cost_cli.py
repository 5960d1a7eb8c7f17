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
