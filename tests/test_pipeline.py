"""The pipeline end to end on a tiny model: variants, cache, resume, gates, exit codes, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmctl.cli.main import app
from llmctl.pipeline import resolve_model_dir
from llmctl.pipeline.cache import StepCache
from llmctl.pipeline.run import run_pipeline
from llmctl.profiles import load_profile, load_profile_file

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
VARIANTS = [
    {"name": "fp32"},
    {"name": "int4-b32", "quantization": {"method": "int4", "block_size": 32, "accuracy_level": 4}},
    {"name": "int8-dynamic", "quantization": {"method": "int8", "mode": "dynamic", "per_channel": True}},
]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    """A small suite: perplexity on the test corpus, parity against the unquantized model, speed."""
    suite = {
        "name": "pipeline-test",
        "tasks": [
            {"name": "corpus", "type": "perplexity", "data": str(CORPUS), "context": 64},
            {"name": "parity", "type": "parity", "samples": 2, "length": 16, "greedy_tokens": 4},
            {"name": "speed", "type": "speed", "prompt_tokens": 8, "output_tokens": 4, "repeats": 1},
        ],
        "gates": ["parity.top1_agreement >= 0.05"],
    }
    path = tmp_path_factory.mktemp("suite") / "suite.yaml"
    path.write_text(yaml.safe_dump(suite), encoding="utf-8")
    return path


def write_profile(folder: Path, suite: Path, *, gates=(), variants=VARIANTS, select="smallest", name="profile") -> Path:
    """Write a copy of the default profile with the test suite, gates and variants."""
    data = load_profile("cpu-x86-avx2").model_dump(mode="json", exclude_none=True)
    data["name"] = "pipeline-test"
    data["eval"] = {"suite": str(suite), "gates": list(gates)}
    data["recipe"]["variants"] = variants
    data["recipe"]["select"] = select
    # int4 on a 64-wide random model drifts far more than on a real one; the eval gates decide here.
    data["recipe"]["quantize_tolerance"] = {"min_top1_agreement": 0.01}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first_run(tiny_llama, suite_file, tmp_path_factory):
    """One full pipeline run of three variants, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("pipeline")
    profile = write_profile(folder, suite_file)
    events = []
    result = run_pipeline(tiny_llama, folder / "out", profile=load_profile_file(profile), on_event=events.append)
    return result, events, profile


def copy_run(result, destination: Path) -> Path:
    """Copy a pipeline folder, links kept as links, so a test can change it."""
    shutil.copytree(result.plan.out, destination, symlinks=True)
    return destination


def statuses(result) -> dict[str, str]:
    return {record.step: record.status for record in result.steps}


def test_run_builds_every_variant(first_run):
    result, _, _ = first_run
    assert statuses(result) == {
        "convert": "built", "quantize int4-b32": "built", "quantize int8-dynamic": "built",
        "eval fp32": "built", "eval int4-b32": "built", "eval int8-dynamic": "built",
    }
    assert [variant.name for variant in result.variants] == ["fp32", "int4-b32", "int8-dynamic"]
    for variant in result.variants:
        assert variant.error is None, variant.error
        assert variant.passed
        assert (result.plan.out / "variants" / variant.name / "llmctl.json").is_file()
        assert variant.size_bytes > 0
        assert variant.metrics["perplexity"] is not None
        assert variant.metrics["decode_tps"] is not None


def test_run_selects_smallest_passing(first_run):
    result, _, _ = first_run
    smallest = min(result.variants, key=lambda v: v.size_bytes)
    assert result.selected == smallest.name
    selected = result.plan.out / "selected"
    assert selected.is_symlink()
    assert os.readlink(selected) == f"variants/{smallest.name}"
    assert resolve_model_dir(result.plan.out) == (result.plan.out / "variants" / smallest.name).resolve()


def test_run_unquantized_parity_is_exact(first_run):
    result, _, _ = first_run
    fp32 = result.variants[0]
    assert fp32.metrics["top1_agreement"] == 1.0
    assert fp32.metrics["kl_mean"] == pytest.approx(0.0, abs=1e-6)


def test_run_reports_written(first_run):
    result, _, _ = first_run
    report = json.loads((result.plan.out / "report.json").read_text(encoding="utf-8"))
    assert report["selected"] == result.selected
    assert [v["name"] for v in report["variants"]] == ["fp32", "int4-b32", "int8-dynamic"]
    assert all(v["gates"] for v in report["variants"])
    markdown = (result.plan.out / "report.md").read_text(encoding="utf-8")
    assert f"Selected: **{result.selected}**" in markdown
    assert "| int8-dynamic |" in markdown or "| **int8-dynamic** |" in markdown


def test_run_progress_events(first_run):
    _, events, _ = first_run
    done = [event for event in events if event.phase == "done"]
    assert [event.step for event in done][:3] == ["convert", "quantize int4-b32", "quantize int8-dynamic"]
    assert all(event.duration_s is not None and event.duration_s >= 0 for event in done)
    starts = [event for event in events if event.phase == "start"]
    assert starts[0].action.startswith("convert ")


def test_rerun_unchanged_hits_cache(first_run, tmp_path):
    result, _, profile = first_run
    out = copy_run(result, tmp_path / "out")
    again = run_pipeline(result.plan.source, out, profile=load_profile_file(profile))
    assert set(statuses(again).values()) == {"cached"}
    assert again.selected == result.selected


def test_rerun_rebuilds_corrupted_artifact(first_run, tmp_path):
    result, _, profile = first_run
    out = copy_run(result, tmp_path / "out")
    data = (out / "variants" / "int8-dynamic").resolve() / "model.onnx.data"
    with open(data, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02\x03")
    again = run_pipeline(result.plan.source, out, profile=load_profile_file(profile))
    assert statuses(again)["quantize int8-dynamic"] == "built"
    assert statuses(again)["quantize int4-b32"] == "cached"
    from llmctl.artifacts import read_manifest, verify_manifest

    rebuilt = (out / "variants" / "int8-dynamic").resolve()
    assert verify_manifest(rebuilt, read_manifest(rebuilt)) == []


def test_rerun_changed_block_size_rebuilds_one_variant(first_run, suite_file, tmp_path):
    result, _, _ = first_run
    out = copy_run(result, tmp_path / "out")
    variants = [dict(v) for v in VARIANTS]
    variants[1] = {"name": "int4-b32", "quantization": {"method": "int4", "block_size": 64, "accuracy_level": 4}}
    profile = write_profile(tmp_path, suite_file, variants=variants)
    again = run_pipeline(result.plan.source, out, profile=load_profile_file(profile))
    assert statuses(again) == {
        "convert": "cached", "quantize int4-b32": "built", "quantize int8-dynamic": "cached",
        "eval fp32": "cached", "eval int4-b32": "built", "eval int8-dynamic": "cached",
    }


def test_variants_option_narrows(first_run, tmp_path):
    result, _, profile = first_run
    out = copy_run(result, tmp_path / "out")
    again = run_pipeline(result.plan.source, out, profile=load_profile_file(profile), variants=["int8-dynamic"])
    assert [v.name for v in again.variants] == ["int8-dynamic"]
    assert again.selected == "int8-dynamic"
    assert sorted(p.name for p in (out / "variants").iterdir()) == ["int8-dynamic"]


def test_interrupted_run_resumes(first_run, suite_file, tmp_path, monkeypatch):
    result, _, profile = first_run
    # Only the convert step is kept: the quantize and eval entries are dropped as if never run.
    out = copy_run(result, tmp_path / "out")
    for entry in (out / "cache").iterdir():
        if entry.is_dir() and not entry.name.startswith("convert-"):
            shutil.rmtree(entry)

    import llmctl.pipeline.run as pipeline_run

    real_eval = pipeline_run._run_eval

    def crash_in_second_eval(plan, model_dir, reference, staging):
        if model_dir == StepCache(out / "cache").output(plan.variants[1].build):
            (staging / "partial.json").write_text("{", encoding="utf-8")
            raise KeyboardInterrupt
        return real_eval(plan, model_dir, reference, staging)

    monkeypatch.setattr(pipeline_run, "_run_eval", crash_in_second_eval)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(result.plan.source, out, profile=load_profile_file(profile))
    leftovers = [p for p in (out / "cache").rglob(".output.tmp-*")]
    assert leftovers == []
    monkeypatch.setattr(pipeline_run, "_run_eval", real_eval)

    resumed = run_pipeline(result.plan.source, out, profile=load_profile_file(profile))
    assert statuses(resumed) == {
        "convert": "cached", "quantize int4-b32": "cached", "quantize int8-dynamic": "cached",
        "eval fp32": "cached", "eval int4-b32": "built", "eval int8-dynamic": "built",
    }
    assert resumed.selected == result.selected


def test_variant_failing_gate_not_selected(first_run, suite_file, tmp_path):
    result, _, _ = first_run
    out = copy_run(result, tmp_path / "out")
    # Only the unquantized model agrees with itself on every token.
    profile = write_profile(tmp_path, suite_file, gates=["parity.top1_agreement >= 1.0"], select="smallest")
    again = run_pipeline(result.plan.source, out, profile=load_profile_file(profile))
    by_name = {v.name: v for v in again.variants}
    assert by_name["fp32"].passed
    assert again.selected == "fp32"
    for name in ("int4-b32", "int8-dynamic"):
        if by_name[name].metrics["top1_agreement"] < 1.0:
            assert not by_name[name].passed
            assert "parity.top1_agreement >= 1.0" in by_name[name].missed_gates()[0]
    assert statuses(again)["quantize int4-b32"] == "cached"


def test_cli_none_passing_exits_1(first_run, suite_file, tmp_path):
    result, _, _ = first_run
    out = copy_run(result, tmp_path / "out")
    profile = write_profile(tmp_path, suite_file, gates=["corpus.perplexity <= 1.0"])
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(result.plan.source), "-p", str(profile), "-o", str(out), "--json"])
    assert outcome.exit_code == 1, outcome.output
    assert "no variant passed every gate" in outcome.output
    assert "int8-dynamic: corpus.perplexity <= 1.0 (fail" in outcome.output
    document = json.loads(outcome.stdout[: outcome.stdout.rindex("}") + 1])
    assert document["selected"] is None
    assert not (out / "selected").exists()
    assert all(not v["passed"] for v in document["variants"])


def test_cli_table_not_cut_in_file(first_run, tmp_path):
    result, _, profile = first_run
    out = copy_run(result, tmp_path / "out")
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(result.plan.source), "-p", str(profile), "-o", str(out)])
    assert outcome.exit_code == 0, outcome.output
    table = outcome.stdout[: outcome.stdout.index("selected ")]
    assert "…" not in table
    assert "int8-dynamic" in table
    assert "passed" in table


def test_cli_dry_run_does_no_work(tiny_llama, suite_file, tmp_path):
    profile = write_profile(tmp_path, suite_file)
    out = tmp_path / "out"
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(tiny_llama), "-p", str(profile), "-o", str(out), "--dry-run"])
    assert outcome.exit_code == 0, outcome.output
    assert "quantize int8-dynamic" in outcome.stdout
    assert "to run" in outcome.stdout
    assert "pre-flight disk: ok" in outcome.output
    assert not out.exists()


def test_cli_dry_run_json_lists_cached_plan(first_run):
    result, _, profile = first_run
    outcome = CliRunner().invoke(
        app, ["pipeline", "run", str(result.plan.source), "-p", str(profile), "-o", str(result.plan.out), "--dry-run", "--json"]
    )
    assert outcome.exit_code == 0, outcome.output
    document = json.loads(outcome.stdout)
    assert document["dry_run"] is True
    assert document["preflight"]["ok"] is True
    assert [s["step"] for s in document["plan"]["steps"]][0] == "convert"
    assert document["preflight"]["estimates"]["disk_bytes_needed"] == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--variants", "int3"], "unknown variant 'int3'"),
        (["--select", "random"], "unknown selection rule 'random'"),
    ],
)
def test_cli_usage_errors_exit_2(tiny_llama, suite_file, tmp_path, arguments, message):
    profile = write_profile(tmp_path, suite_file)
    out = tmp_path / "out"
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(tiny_llama), "-p", str(profile), "-o", str(out), *arguments])
    assert outcome.exit_code == 2, outcome.output
    assert message in outcome.output
    assert not out.exists()


def test_cli_unsupported_source_leaves_no_folder(tiny_llama, suite_file, tmp_path):
    source = tmp_path / "foo"
    shutil.copytree(tiny_llama, source)
    config = json.loads((source / "config.json").read_text())
    config.update(architectures=["FooForCausalLM"], model_type="foo")
    (source / "config.json").write_text(json.dumps(config))
    profile = write_profile(tmp_path, suite_file)
    out = tmp_path / "out"
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(source), "-p", str(profile), "-o", str(out)])
    assert outcome.exit_code == 2, outcome.output
    assert not out.exists()


def test_cli_output_inside_source_exits_2(tiny_llama, suite_file, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    profile = write_profile(tmp_path, suite_file)
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(source), "-p", str(profile), "-o", str(source / "pipe")])
    assert outcome.exit_code == 2, outcome.output
    assert "inside the source folder" in outcome.output
    assert not (source / "pipe").exists()


def test_cli_unwritable_output_exits_2(tiny_llama, suite_file, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK and real_access(path, mode))
    profile = write_profile(tmp_path, suite_file)
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(tiny_llama), "-p", str(profile), "-o", str(tmp_path / "ro" / "out")])
    assert outcome.exit_code == 2, outcome.output
    assert "permission denied" in outcome.output
    assert not (tmp_path / "ro").exists()


def test_cli_missing_source_exits_2(tmp_path):
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert outcome.exit_code == 2
    assert "not found" in outcome.output


def test_cli_output_is_a_file_exits_2(tiny_llama, tmp_path):
    target = tmp_path / "file"
    target.write_text("x", encoding="utf-8")
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(tiny_llama), "-o", str(target)])
    assert outcome.exit_code == 2
    assert "is a file" in outcome.output


def test_preflight_disk_failure_stops_before_work(tiny_llama, suite_file, tmp_path, monkeypatch):
    import llmctl.pipeline.preflight as preflight

    monkeypatch.setattr(preflight, "DISK_MARGIN", 1e9)
    profile = write_profile(tmp_path, suite_file)
    out = tmp_path / "out"
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(tiny_llama), "-p", str(profile), "-o", str(out)])
    assert outcome.exit_code == 2, outcome.output
    assert "pre-flight check disk failed" in outcome.output
    assert not (out / "variants").exists()


def test_preflight_unknown_suite_exits_2(tiny_llama, tmp_path):
    data = load_profile("cpu-x86-avx2").model_dump(mode="json", exclude_none=True)
    data["eval"] = {"suite": "no-such-suite"}
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(data), encoding="utf-8")
    outcome = CliRunner().invoke(app, ["pipeline", "run", str(tiny_llama), "-p", str(profile), "-o", str(tmp_path / "out")])
    assert outcome.exit_code == 2
    assert "unknown suite 'no-such-suite'" in outcome.output


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="chromium not installed at /usr/bin/chromium")
def test_html_report_renders_in_chromium(first_run, tmp_path):
    result, _, _ = first_run
    html = result.plan.out / "report.html"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert 'id="quality-chart"' in dom
    # The image's onload handler stores its decoded width: the browser rendered the chart.
    assert 'data-rendered="1000"' in dom
    assert 'id="report-card"' in dom
    for variant in result.variants:
        assert f'data-variant="{variant.name}"' in dom

    screenshot = tmp_path / "report.png"
    subprocess.run(
        [str(CHROMIUM), *flags, "--window-size=1200,1000", f"--screenshot={screenshot}", html.as_uri()],
        capture_output=True, timeout=120, check=True,
    )
    assert screenshot.stat().st_size > 10_000


def test_generate_uses_selected_variant(first_run):
    result, _, _ = first_run
    from llmctl.runtime import open_backend

    backend = open_backend(result.plan.out)
    try:
        assert backend.model_path.resolve() == (result.plan.out / "variants" / result.selected).resolve()
    finally:
        backend.close()
    outcome = CliRunner().invoke(app, ["generate", str(result.plan.out), "The capital of France", "--max-tokens", "2"])
    assert outcome.exit_code == 0, outcome.output
