"""Hardware profiles: built-ins, schema errors, detection, and a new target as a plain YAML file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmctl.cli.main import app
from llmctl.errors import ProfileError
from llmctl.profiles import DEFAULT_PROFILE, builtin_profile_dir, builtin_profile_names, load_profile, load_profile_file
from llmctl.profiles.detect import int8_speedup, read_cpu_flags, read_cpu_model

runner = CliRunner()
REQUIRED_TARGETS = {"cpu-x86-avx2", "cpu-x86-avx512-vnni-c7i", "cpu-arm64-graviton3-c7g", "gpu-nvidia-t4",
                    "gpu-nvidia-l4", "gpu-nvidia-a100-80gb", "gpu-nvidia-h100-80gb"}

X86_CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_int8
"""
ARM_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm bf16
"""


def test_builtins_cover_required_targets():
    assert REQUIRED_TARGETS <= set(builtin_profile_names())
    assert DEFAULT_PROFILE in builtin_profile_names()


@pytest.mark.parametrize("name", builtin_profile_names())
def test_builtin_validates(name):
    profile = load_profile(name)
    assert profile.name == name  # the file stem is the name users type
    assert profile.hardware.sources, "numbers need a cited source"


@pytest.mark.parametrize("name", sorted(n for n in REQUIRED_TARGETS if n.startswith("gpu-")))
def test_builtin_gpu_priced_and_cited(name):
    profile = load_profile(name)
    assert profile.hardware.price is not None
    assert profile.hardware.price.source
    assert profile.runtime.execution_provider == "cuda"
    assert profile.recipe.dtype == "fp16"


def write_profile(path: Path, change) -> Path:
    data = yaml.safe_load((builtin_profile_dir() / "cpu-x86-avx2.yaml").read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_unknown_key_rejected_with_location(tmp_path):
    path = write_profile(tmp_path / "typo.yaml", lambda d: d["hardware"].update({"memroy_gb": 8}))
    with pytest.raises(ProfileError) as error:
        load_profile_file(path)
    assert f"{path}: hardware.memroy_gb: unknown key" in str(error.value)


def test_missing_bandwidth_named(tmp_path):
    path = write_profile(tmp_path / "nobw.yaml", lambda d: d["hardware"].pop("memory_bandwidth_gbps"))
    with pytest.raises(ProfileError, match="hardware.memory_bandwidth_gbps"):
        load_profile_file(path)


def test_validate_cli_reports_field(tmp_path):
    path = write_profile(tmp_path / "bad.yaml", lambda d: d["cost_model"].update({"decode_efficiency": 1.5}))
    result = runner.invoke(app, ["profiles", "validate", str(path)])
    assert result.exit_code == 2
    assert "cost_model.decode_efficiency" in result.stderr


def test_new_target_is_yaml_only(tmp_path):
    def make_target(data: dict) -> None:
        data["name"] = "my-workstation"
        data["hardware"].update({"name": "My workstation", "memory_gb": 64, "memory_bandwidth_gbps": 89.6,
                                 "price": {"usd_per_hour": 0.12, "source": "own estimate", "date": "2026-01-05"}})

    path = write_profile(tmp_path / "my-workstation.yaml", make_target)
    assert runner.invoke(app, ["profiles", "validate", str(path)]).exit_code == 0
    shown = runner.invoke(app, ["profiles", "show", str(path), "--json"])
    assert json.loads(shown.stdout)["hardware"]["memory_bandwidth_gbps"] == 89.6
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}), encoding="utf-8")
    estimate = runner.invoke(app, ["cost-estimate", str(model), "--profile", str(path), "--json"])
    assert estimate.exit_code == 0, estimate.output
    assert json.loads(estimate.stdout)["rows"][0]["usd_per_hour"] == 0.12


def test_list_shows_every_builtin():
    result = runner.invoke(app, ["profiles", "list", "--json"])
    assert result.exit_code == 0
    assert {p["name"] for p in json.loads(result.stdout)} == set(builtin_profile_names())


def test_cpu_flags_x86():
    arch, isa = read_cpu_flags(X86_CPUINFO)
    assert arch == "x86_64"
    assert {"avx2", "avx512_vnni", "amx_int8"} <= set(isa)
    assert read_cpu_model(X86_CPUINFO) == "Intel(R) Xeon(R) Platinum 8488C"


def test_cpu_flags_arm64():
    arch, isa = read_cpu_flags(ARM_CPUINFO)
    assert arch == "arm64"
    assert {"neon", "asimddp", "sve", "i8mm", "bf16", "fp16"} <= set(isa)


def test_int8_speedup_from_isa():
    assert int8_speedup(["avx2", "avx512_vnni"]) == 4.0
    assert int8_speedup(["avx2"]) == 2.0
    assert int8_speedup([]) == 1.0


def test_detect_writes_valid_profile(tmp_path):
    out = tmp_path / "here.yaml"
    result = runner.invoke(app, ["profiles", "detect", "-o", str(out), "--name", "this-machine"])
    assert result.exit_code == 0, result.output
    profile = load_profile_file(out)
    assert profile.name == "this-machine"
    assert profile.hardware.memory_bandwidth_gbps > 0
    assert profile.hardware.peak_tflops["fp32"] > 0
    assert profile.hardware.cores >= 1


def test_detect_keeps_existing_file(tmp_path):
    out = tmp_path / "here.yaml"
    out.write_text("keep me", encoding="utf-8")
    result = runner.invoke(app, ["profiles", "detect", "-o", str(out)])
    assert result.exit_code == 2
    assert out.read_text(encoding="utf-8") == "keep me"


def test_detect_rejects_bad_name(tmp_path):
    result = runner.invoke(app, ["profiles", "detect", "-o", str(tmp_path / "x.yaml"), "--name", "Bad Name"])
    assert result.exit_code == 2
    assert not (tmp_path / "x.yaml").exists()
