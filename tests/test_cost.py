"""Cost model: exact parameter and KV-cache figures from published configs, weight bytes, estimates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.cost.calibrate import calibrate_profile, read_speed_measurement
from llmctl.cost.estimate import Targets, WorkloadSpec, estimate_costs, estimate_profile
from llmctl.cost.model_config import ModelConfig, load_model_config
from llmctl.cost.model_stats import model_stats
from llmctl.errors import InputError, UsageError
from llmctl.profiles import load_profile

# Configs written from the published config.json files of each model (no download).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 8192,
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "tie_word_embeddings": True, "head_dim": 64, "attention_bias": False, "mlp_bias": False,
}
GEMMA3_270M = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "vocab_size": 262144, "sliding_window": 512, "sliding_window_pattern": 6, "tie_word_embeddings": True,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"]
    + ["sliding_attention"] * 5 + ["full_attention"],
}
MIXTRAL_8X7B = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
    "num_experts_per_tok": 2, "tie_word_embeddings": False, "sliding_window": None,
}


def stats_of(values: dict, name: str = "model"):
    return model_stats(ModelConfig(dict(values), f"{name}/config.json", name))


def write_config(folder: Path, values: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values), encoding="utf-8")
    return folder


# --- parameter counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [(LLAMA3_8B, 8_030_261_248), (SMOLLM2_135M, 134_515_008), (GEMMA3_270M, 268_098_176)],
    ids=["llama3-8b", "smollm2-135m", "gemma3-270m"],
)
def test_params_match_published(config, expected):
    assert stats_of(config).total_params == expected


def test_params_tied_embedding_counted_once():
    untied = stats_of({**SMOLLM2_135M, "tie_word_embeddings": False})
    assert untied.total_params - stats_of(SMOLLM2_135M).total_params == 49152 * 576


def test_params_head_dim_explicit():
    wide = stats_of({**SMOLLM2_135M, "head_dim": 128})
    # q and o grow by 576 x 9 x 64 each, k and v by 576 x 3 x 64 each, per layer
    assert wide.total_params - stats_of(SMOLLM2_135M).total_params == 30 * 576 * 64 * (9 + 9 + 3 + 3)


def test_params_attention_and_mlp_bias():
    biased = stats_of({**SMOLLM2_135M, "attention_bias": True, "mlp_bias": True})
    per_layer = (576 + 2 * 192 + 576) + (2 * 1536 + 576)
    assert biased.total_params - stats_of(SMOLLM2_135M).total_params == 30 * per_layer


def test_params_moe_total_and_active():
    stats = stats_of(MIXTRAL_8X7B)
    # Mixtral 8x7B: 46.7B parameters in total, 12.9B active per token (two of eight experts)
    assert round(stats.total_params / 1e9, 1) == 46.7
    assert round(stats.active_params / 1e9, 1) == 12.9


def test_params_plain_mlp_gpt_neox():
    config = {"model_type": "gpt_neox", "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6,
              "num_attention_heads": 8, "vocab_size": 50304, "tie_word_embeddings": False}
    stats = stats_of(config)
    per_layer = 4 * 512 * 512 + 4 * 512 + 2 * 512 * 2048 + 2048 + 512 + 2 * 2 * 512
    assert stats.total_params == 6 * per_layer + 2 * 50304 * 512 + 2 * 512


# --- KV cache ----------------------------------------------------------------------------------------


def test_kv_per_token_llama3():
    assert stats_of(LLAMA3_8B).kv_bytes_per_token("fp16") == 131_072


def test_kv_per_token_smollm2():
    assert stats_of(SMOLLM2_135M).kv_bytes_per_token("fp16") == 23_040


def test_kv_gemma3_global_and_sliding():
    stats = stats_of(GEMMA3_270M)
    assert stats.kv_bytes_per_token("fp16", sliding=False) == 3_072
    assert stats.kv_bytes_per_token("fp16", sliding=True) == 15_360


def test_kv_gemma3_sequence_capped_at_window():
    stats = stats_of(GEMMA3_270M)
    assert stats.kv_bytes_for_sequence(8192, "fp16") == 33_030_144
    assert stats.kv_bytes_window_blind(8192, "fp16") == 150_994_944


def test_kv_gemma3_pattern_without_layer_types():
    config = {k: v for k, v in GEMMA3_270M.items() if k != "layer_types"}
    assert stats_of(config).kv_bytes_for_sequence(8192, "fp16") == 33_030_144


def test_kv_dtype_parameter():
    stats = stats_of(SMOLLM2_135M)
    assert stats.kv_bytes_per_token("fp32") == 2 * stats.kv_bytes_per_token("fp16")
    assert stats.kv_bytes_per_token("int8") == stats.kv_bytes_per_token("fp16") // 2


# --- weight bytes ------------------------------------------------------------------------------------


def test_weight_bytes_float():
    stats = stats_of(LLAMA3_8B)
    assert stats.weight_bytes("fp16").total == 2 * 8_030_261_248
    assert stats.weight_bytes("fp32").total == 4 * 8_030_261_248


def test_weight_bytes_int4_scales_and_zero_points():
    stats = stats_of(SMOLLM2_135M)
    symmetric = stats.weight_bytes("int4", float_dtype="fp32", block_size=32, symmetric=True)
    asymmetric = stats.weight_bytes("int4", float_dtype="fp32", block_size=32, symmetric=False)
    matrix_params = stats.total_params - stats.other_params
    assert symmetric.quantized_bytes == matrix_params // 2
    assert symmetric.scale_bytes == matrix_params // 32 * 4
    assert symmetric.zero_point_bytes == 0
    assert asymmetric.zero_point_bytes == matrix_params // 32 // 2


def test_weight_bytes_int8_dynamic_per_column():
    stats = stats_of(SMOLLM2_135M)
    dynamic = stats.weight_bytes("int8", int8_mode="dynamic", float_dtype="fp32")
    assert dynamic.quantized_bytes == stats.total_params - stats.other_params
    assert dynamic.scale_bytes < dynamic.quantized_bytes / 100


def test_weight_bytes_float_embedding_kept():
    stats = stats_of(GEMMA3_270M)
    kept = stats.weight_bytes("int4", quantize_embeddings=False, float_dtype="fp32")
    assert kept.float_bytes >= 262144 * 640 * 4


# --- bad configs ---------------------------------------------------------------------------------------


def test_config_missing_field_named(tmp_path):
    folder = write_config(tmp_path / "m", {k: v for k, v in SMOLLM2_135M.items() if k != "num_hidden_layers"})
    with pytest.raises(InputError, match="num_hidden_layers"):
        model_stats(load_model_config(folder))


def test_config_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        load_model_config(tmp_path)


def test_config_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="not valid JSON"):
        load_model_config(path)


def test_config_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        load_model_config("someone/not-cached-model")


def test_config_text_config_nested(tmp_path):
    folder = write_config(tmp_path / "mm", {"model_type": "gemma3", "text_config": GEMMA3_270M})
    assert model_stats(load_model_config(folder)).total_params == 268_098_176


# --- estimates -----------------------------------------------------------------------------------------


def workload(**overrides) -> WorkloadSpec:
    values = {"prompt_tokens": 512, "output_tokens": 128}
    if not {"requests_per_second", "tokens_per_day"} & overrides.keys():
        values["concurrency"] = 1
    values.update(overrides)
    return WorkloadSpec(**values)


def test_estimate_decode_is_bandwidth_bound():
    profile = load_profile("gpu-nvidia-h100-80gb")
    result = estimate_profile(stats_of(LLAMA3_8B), profile, workload(), quant="fp16")
    weights = 2 * 8_030_261_248 - 2 * 128256 * 4096  # the untied input embedding is only looked up
    floor_ms = weights / (3350e9 * profile.cost_model.decode_efficiency) * 1e3 + profile.cost_model.step_overhead_ms
    assert result.decode_bound == "memory"
    assert result.tpot_ms == pytest.approx(floor_ms, rel=0.02)


def test_estimate_batching_raises_throughput_until_compute_bound():
    profile = load_profile("gpu-nvidia-l4")
    stats = stats_of(SMOLLM2_135M)
    per_instance = [estimate_profile(stats, profile, workload(concurrency=c), quant="fp16").tokens_per_second_per_instance
                    for c in (1, 4, 32)]
    assert per_instance[0] < per_instance[1] < per_instance[2]
    saturated = estimate_profile(stats, profile.model_copy(update={"serve": profile.serve.model_copy(
        update={"max_concurrency": 4096})}), workload(prompt_tokens=8, output_tokens=8, concurrency=4096), quant="fp16")
    assert saturated.decode_bound == "compute"


def test_estimate_prefill_compute_bound_ttft():
    profile = load_profile("gpu-nvidia-a100-80gb")
    stats = stats_of(LLAMA3_8B)
    result = estimate_profile(stats, profile, workload(prompt_tokens=2048), quant="fp16")
    flops = 2048 * 2 * stats.compute_params_per_token()
    assert result.ttft_ms >= flops / (312e12 * profile.cost_model.prefill_efficiency) * 1e3


def test_estimate_does_not_fit_reports_shortfall():
    result = estimate_profile(stats_of(LLAMA3_8B), load_profile("gpu-nvidia-t4"), workload(), quant="fp16")
    assert not result.fits
    assert result.shortfall_gb > 0
    assert "short by" in result.problems[0]


def test_estimate_fits_no_profile_note():
    huge = {**LLAMA3_8B, "num_hidden_layers": 400}
    profiles = [load_profile("gpu-nvidia-t4"), load_profile("gpu-nvidia-l4")]
    report = estimate_costs(stats_of(huge), profiles, workload(), quant="fp16")
    assert report.cheapest is None
    assert "fits no chosen profile" in report.notes[0]
    assert "short by" in report.notes[0]


def test_estimate_cost_and_cheapest_meeting_targets():
    profiles = [load_profile(n) for n in ("gpu-nvidia-t4", "gpu-nvidia-l4", "gpu-nvidia-h100-80gb")]
    report = estimate_costs(stats_of(LLAMA3_8B), profiles, workload(requests_per_second=2.0), quant="int4",
                            targets=Targets(min_tokens_per_second=60))
    priced = [r.usd_per_million_tokens for r in report.rows if r.usd_per_million_tokens is not None]
    assert priced == sorted(priced)
    assert report.cheapest == next(r.profile for r in report.rows if r.meets_targets)
    for row in report.rows:
        assert row.usd_per_month == pytest.approx(row.usd_per_hour * 730)


def test_estimate_latency_target_marks_row():
    report = estimate_costs(stats_of(SMOLLM2_135M), [load_profile("cpu-x86-avx2")], workload(),
                            targets=Targets(max_ttft_ms=0.001), price_per_hour=0.1)
    row = report.rows[0]
    assert not row.meets_targets
    assert "time to first token" in row.problems[0]


def test_estimate_missing_price_named():
    result = estimate_profile(stats_of(SMOLLM2_135M), load_profile("cpu-x86-avx2"), workload())
    assert result.usd_per_hour is None
    assert any("--price-per-hour" in p for p in result.problems)


def test_estimate_price_flag_fills_missing_price():
    result = estimate_profile(stats_of(SMOLLM2_135M), load_profile("cpu-x86-avx2"), workload(), price_per_hour=0.5)
    assert result.usd_per_hour == 0.5
    assert result.assumptions["price"]["source"] == "--price-per-hour"


def test_estimate_more_load_more_instances():
    profile = load_profile("cpu-x86-avx2")
    stats = stats_of(SMOLLM2_135M)
    low = estimate_profile(stats, profile, workload(requests_per_second=0.1), price_per_hour=1)
    high = estimate_profile(stats, profile, workload(requests_per_second=50), price_per_hour=1)
    assert high.instances > low.instances
    tokens_per_day = estimate_profile(stats, profile, workload(tokens_per_day=640 * 86400 * 50), price_per_hour=1)
    assert tokens_per_day.instances == high.instances


@pytest.mark.parametrize("field", ["prompt_tokens", "output_tokens", "concurrency"])
@pytest.mark.parametrize("value", [0, -5])
def test_workload_rejects_non_positive(field, value):
    with pytest.raises(UsageError, match="must be greater than 0"):
        workload(**{field: value})


def test_workload_rejects_two_loads():
    with pytest.raises(UsageError, match="exactly one"):
        workload(concurrency=2, requests_per_second=1.0)


# --- calibration ---------------------------------------------------------------------------------------


def eval_results(path: Path, profile: str, decode_tps: float, prefill_tps: float) -> Path:
    """Write the speed part of an ``llmctl eval`` results document."""
    document = {
        "schema_version": 1, "profile": {"name": profile},
        "tasks": [{"name": "speed", "type": "speed", "status": "ok",
                   "metrics": {"decode_tps": {"value": decode_tps}, "prefill_tps": {"value": prefill_tps},
                               "ttft_ms": {"value": 64 / prefill_tps * 1000}},
                   "details": {"prompt_tokens": 64, "output_tokens": [32, 32]}}],
        "metrics": {},
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_calibration_reads_eval_results(tmp_path):
    measurement = read_speed_measurement(eval_results(tmp_path / "r.json", "cpu-x86-avx2", 100.0, 800.0))
    assert measurement.profile == "cpu-x86-avx2"
    assert measurement.decode_tps == 100.0
    assert measurement.prompt_tokens == 64
    assert measurement.output_tokens == 32


def test_calibration_reads_minimal_shape(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"profile": "x", "speed": {"decode_tps": 50, "ttft_ms": 100, "prompt_tokens": 40}}))
    measurement = read_speed_measurement(path)
    assert measurement.prefill_tps == pytest.approx(400.0)


def test_calibration_without_speed_rejected(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"profile": "x", "tasks": []}))
    with pytest.raises(InputError, match="decode tokens/s"):
        read_speed_measurement(path)


def test_calibration_matches_measurement(tmp_path):
    stats = stats_of(SMOLLM2_135M)
    profile = load_profile("cpu-x86-avx2")
    measurement = read_speed_measurement(eval_results(tmp_path / "r.json", profile.name, 90.0, 700.0))
    calibrated, record = calibrate_profile(stats, profile, measurement)
    assert record["estimate_after"]["decode_tps"] == pytest.approx(90.0, rel=0.01)
    assert record["estimate_after"]["prefill_tps"] == pytest.approx(700.0, rel=0.05)
    assert calibrated.cost_model.decode_efficiency != profile.cost_model.decode_efficiency
    assert calibrated.cost_model.calibrated_from


def test_calibration_caps_efficiency_at_one(tmp_path):
    stats = stats_of(SMOLLM2_135M)
    profile = load_profile("cpu-x86-avx2")
    measurement = read_speed_measurement(eval_results(tmp_path / "r.json", profile.name, 1e6, 700.0))
    calibrated, record = calibrate_profile(stats, profile, measurement)
    assert calibrated.cost_model.decode_efficiency == 1.0
    assert record["notes"]


def test_estimate_costs_one_workload_per_profile():
    profiles = [load_profile("cpu-x86-avx2"), load_profile("gpu-nvidia-t4")]
    workloads = [workload(kv_cache_dtype="fp32"), workload(kv_cache_dtype="fp16")]
    report = estimate_costs(stats_of(SMOLLM2_135M), profiles, workloads)
    by_profile = {row.profile: row for row in report.rows}
    assert by_profile["cpu-x86-avx2"].workload["kv_cache_dtype"] == "fp32"
    assert by_profile["gpu-nvidia-t4"].workload["kv_cache_dtype"] == "fp16"
    assert report.workload["varies_by_profile"] == ["kv_cache_dtype"]


def test_estimate_costs_rejects_mismatched_workloads():
    with pytest.raises(UsageError, match="2 workloads for 1 profiles"):
        estimate_costs(stats_of(SMOLLM2_135M), [load_profile("cpu-x86-avx2")], [workload(), workload()])


@pytest.mark.parametrize("value", [0.0, -5.0, float("nan"), float("inf")])
def test_targets_reject_impossible_values(value):
    with pytest.raises(UsageError, match="--max-ttft-ms"):
        Targets(max_ttft_ms=value)


def test_workload_rejects_infinite_rate():
    with pytest.raises(UsageError, match="--requests-per-second must be a finite number"):
        workload(requests_per_second=float("inf"))


def test_estimate_warns_past_context_length():
    stats = stats_of({**SMOLLM2_135M, "max_position_embeddings": 600})
    report = estimate_costs(stats, [load_profile("cpu-x86-avx2")], workload())
    assert report.warnings == [
        "640 tokens per stream exceed the model's context length of 600 (max_position_embeddings in its config); "
        "check --prompt-tokens, --output-tokens and --context"
    ]


def test_estimate_note_without_targets_names_price():
    report = estimate_costs(stats_of(SMOLLM2_135M), [load_profile("cpu-x86-avx2")], workload())
    assert report.cheapest is None
    assert report.notes == ["no chosen profile that fits has a price, so none is recommended: "
                            "set hardware.price in the profile or pass --price-per-hour"]
