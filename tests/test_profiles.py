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


# --- messages for broken files ----------------------------------------------------------------


def validate(*paths: Path):
    return runner.invoke(app, ["profiles", "validate", *(str(p) for p in paths)])


def test_unknown_key_suggests_closest(tmp_path):
    path = write_profile(tmp_path / "typo.yaml", lambda d: d["recipe"].update({"quantisation": {"method": "int8"}}))
    result = validate(path)
    assert result.exit_code == 2
    assert f"{path}: recipe.quantisation: unknown key; did you mean 'quantization'?" in result.stderr


def test_unknown_key_in_list_item_suggests(tmp_path):
    def change(data: dict) -> None:
        data["recipe"]["variants"] = [{"name": "v", "quantisation": {"method": "int8"}}]

    with pytest.raises(ProfileError, match=r"recipe\.variants\.0\.quantisation: unknown key; did you mean 'quantization'\?"):
        load_profile_file(write_profile(tmp_path / "variant.yaml", change))


def test_unknown_key_without_match_lists_allowed(tmp_path):
    path = write_profile(tmp_path / "odd.yaml", lambda d: d["serve"].update({"zzz": 1}))
    with pytest.raises(ProfileError, match="serve.zzz: unknown key; allowed keys: host, port"):
        load_profile_file(path)


def test_empty_file_named(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    result = validate(path)
    assert result.exit_code == 2
    assert f"{path}: empty file, expected a mapping of keys" in result.stderr
    assert "NoneType" not in result.stderr


@pytest.mark.parametrize(("text", "position", "problem"), [
    ("name: x\nhardware: [\n", "3:1", "found the end of the file"),
    ("name: x\n\tdescription: y\n", "2:1", "found character '\\t' that cannot start any token"),
], ids=["unclosed-list", "tab"])
def test_yaml_error_one_line_with_position(tmp_path, text, position, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as error:
        load_profile_file(path)
    message = error.value.message
    assert message.startswith(f"{path}:{position}: not valid YAML: ")
    assert problem in message
    assert "<unicode string>" not in message
    assert "\n" not in message
    assert "  " not in message


def test_folder_is_not_file_not_found(tmp_path):
    result = validate(tmp_path)
    assert result.exit_code == 2
    assert f"{tmp_path}: is a folder, expected a YAML file" in result.stderr


def test_duplicate_key_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\ndescription: x\nname: b\n", encoding="utf-8")
    with pytest.raises(ProfileError, match=r"dup.yaml:3:1: not valid YAML: duplicate key 'name' \(first given on line 1\)"):
        load_profile_file(path)


def test_duplicate_nested_key_rejected(tmp_path):
    text = (builtin_profile_dir() / "cpu-x86-avx2.yaml").read_text(encoding="utf-8")
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace("  memory_gb: 32\n", "  memory_gb: 32\n  memory_gb: 64\n"), encoding="utf-8")
    with pytest.raises(ProfileError, match="duplicate key 'memory_gb'"):
        load_profile_file(path)


def test_merge_key_override_allowed(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &base {a: 1, b: 2}\nother:\n  <<: *base\n  a: 3\n", encoding="utf-8")
    from llmctl.profiles.loader import _UniqueKeyLoader

    assert yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)["other"] == {"a": 3, "b": 2}


def test_non_utf8_names_byte(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ProfileError, match="not valid UTF-8 at byte 9"):
        load_profile_file(path)


def test_validate_errors_carry_hint(tmp_path):
    path = write_profile(tmp_path / "bad.yaml", lambda d: d["cost_model"].update({"decode_efficiency": 1.5}))
    result = validate(path, tmp_path / "missing.yaml")
    assert result.exit_code == 2
    assert "hint: llmctl profiles show cpu-x86-avx2" in result.stderr


def test_list_table_whole_when_piped():
    result = runner.invoke(app, ["profiles", "list"])
    assert result.exit_code == 0
    assert "…" not in result.stdout
    assert "cpu-x86-avx2 (default)" in result.stdout
