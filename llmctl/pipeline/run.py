"""Run a pipeline: convert once, quantize each variant, evaluate each with the same suite,
select among the variants that pass every gate, and write the report card.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.artifacts import atomic_output, check_writable, folder_bytes, package_versions
from llmctl.errors import LlmctlError, ProfileError, UsageError
from llmctl.pipeline.cache import LOCK_NAME, StepCache, locked
from llmctl.pipeline.plan import (
    Plan,
    PlannedStep,
    PlannedVariant,
    build_plan,
    check_select_rule,
    check_source,
    narrow_variants,
    profile_variants,
)
from llmctl.pipeline.preflight import Preflight, run_preflight
from llmctl.pipeline.select import select_variant
from llmctl.profiles.schema import Profile

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
VARIANTS_DIR = "variants"
SELECTED_NAME = "selected"
RESULTS_NAME = "results.json"


@dataclass
class StepEvent:
    """Progress of one step, for the caller to show.

    Attributes:
        step: the step's label, e.g. ``quantize int4-b32``.
        phase: ``start``, ``done``, ``cached`` or ``failed``.
        action: what the step does, in words.
        duration_s: seconds the step took (``done`` and ``failed`` only).
        error: the failure message (``failed`` only).
    """

    step: str
    phase: str
    action: str
    duration_s: float | None = None
    error: str | None = None


EventHook = Callable[[StepEvent], None]


@dataclass
class VariantOutcome:
    """Measurements, gate outcomes and estimated cost of one variant."""

    name: str
    quantization: dict[str, Any] | None
    path: Path | None = None
    size_bytes: int = 0
    metrics: dict[str, float | None] = field(default_factory=dict)
    task_metrics: dict[str, float | None] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    usd_per_million_tokens: float | None = None
    cost: dict[str, Any] | None = None
    error: str | None = None
    results_path: Path | None = None

    @property
    def passed(self) -> bool:
        """True when the variant was built and evaluated and no gate failed.

        A gate whose metric could not be measured (its task was skipped) does not fail the
        variant, as in ``llmctl eval``. The report lists such a gate as skipped.
        """
        return self.error is None and self.results_path is not None and not any(
            gate.get("outcome") == "fail" for gate in self.gates
        )

    @property
    def estimated_tokens_per_second(self) -> float | None:
        """The cost model's tokens/s per instance on the profile's hardware."""
        return (self.cost or {}).get("tokens_per_second_per_instance")

    def missed_gates(self) -> list[str]:
        """Return why the variant did not pass: its error, or each gate that failed."""
        if self.error:
            return [self.error]
        missed = []
        for gate in self.gates:
            if gate.get("outcome") != "fail":
                continue
            observed = gate.get("observed")
            observed_text = "not measured" if observed is None else f"observed {observed:.4g}"
            reason = f": {gate['reason']}" if gate.get("reason") else ""
            missed.append(f"{gate['expression']} ({gate.get('outcome')}, {observed_text}{reason})")
        return missed

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quantization": self.quantization,
            "path": str(self.path) if self.path else None,
            "size_bytes": self.size_bytes,
            "metrics": self.metrics,
            "task_metrics": self.task_metrics,
            "usd_per_million_tokens": self.usd_per_million_tokens,
            "cost": self.cost,
            "gates": self.gates,
            "passed": self.passed,
            "missed": [] if self.passed else self.missed_gates(),
            "error": self.error,
            "results": str(self.results_path) if self.results_path else None,
        }


@dataclass
class StepRecord:
    """Status and duration of one step in this run."""

    step: str
    key: str
    status: str  # built, cached or failed
    duration_s: float
    path: Path | None = None


@dataclass
class PipelineResult:
    """The outcome of ``run_pipeline``."""

    plan: Plan
    preflight: Preflight
    dry_run: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    variants: list[VariantOutcome] = field(default_factory=list)
    selected: str | None = None
    duration_s: float = 0.0
    reports: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.selected is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "preflight": self.preflight.to_dict(),
            "dry_run": self.dry_run,
            "steps": [
                {"step": s.step, "key": s.key, "status": s.status, "duration_s": round(s.duration_s, 3),
                 "path": str(s.path) if s.path else None}
                for s in self.steps
            ],
            "variants": [variant.to_dict() for variant in self.variants],
            "select": self.plan.select,
            "selected": self.selected,
            "duration_s": round(self.duration_s, 3),
            "reports": {kind: str(path) for kind, path in self.reports.items()},
        }


# --- planning ---------------------------------------------------------------------------


def _suite_inputs(suite_name: str, cache: StepCache) -> tuple[Path, str, dict[str, str]]:
    """Validate the suite and return its file, its hash and the hashes of its data files.

    Raises:
        InputError: the suite is unknown or invalid, or a required data file is missing.
    """
    from llmctl.eval.suite import load_suite, resolve_data_path

    suite, suite_file = load_suite(suite_name)
    data_digests: dict[str, str] = {}
    for task in suite.tasks:
        for attribute in ("data", "labels"):
            value = getattr(task, attribute, None)
            if not value:
                continue
            path, optional = resolve_data_path(value, suite_file)
            if path.is_file():
                data_digests[str(path)] = cache.content_hash(path)
            elif not optional:
                from llmctl.errors import InputError

                raise InputError(f"suite {suite.name!r}: task {task.name!r}: data file {path} not found")
            else:
                # An optional data set that is absent: its task is skipped, which the key must reflect.
                data_digests[str(path)] = "absent"
    return suite_file, cache.content_hash(suite_file), data_digests


def _check_profile_gates(profile: Profile, suite_name: str) -> None:
    """Check the profile's extra gates against the metrics the suite produces.

    Raises:
        ProfileError: a gate names a metric the suite does not produce or is malformed.
    """
    from llmctl.eval.gates import parse_gate
    from llmctl.eval.suite import load_suite

    suite, _ = load_suite(suite_name)
    for expression in profile.eval.gates:
        try:
            parse_gate(expression, suite.metric_names())
        except LlmctlError as error:
            raise ProfileError(f"profile {profile.name!r}: eval.gates: {error.message}", hint=error.hint) from None


def plan_pipeline(
    source: Path,
    out: Path,
    *,
    profile: Profile,
    variants: list[str] | None = None,
    select: str | None = None,
    dry_run: bool = False,
) -> tuple[Plan, Preflight]:
    """Validate the inputs, lay out the steps and run the pre-flight checks.

    Nothing is built; unless ``dry_run``, the memo of input hashes is written under ``out/cache``.

    Raises:
        InputError: the source or the suite cannot be used.
        ProfileError: the profile names no suite or has invalid gates.
        UsageError: an unknown variant or selection rule.
    """
    source = check_source(Path(source)).resolve()
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} is a file", hint="choose a folder path for -o/--output")
    if source.is_dir() and (out == source or source in out.parents):
        # Its cache would land inside the checkpoint and change the source's hash on every run.
        raise UsageError(f"pipeline folder {out} is inside the source folder {source}", hint="choose a folder outside the source")
    if not profile.eval.suite:
        raise ProfileError(f"profile {profile.name!r} names no eval.suite", hint="set eval.suite, e.g. quick")
    # Option mistakes are reported before any input is read or hashed.
    check_select_rule(select or profile.recipe.select)
    narrow_variants(profile_variants(profile), variants, profile.name)

    if not dry_run:
        check_writable(out)
    # A dry run writes nothing, not even the memo of input hashes.
    cache = StepCache(out / CACHE_DIR, persist=not dry_run)
    suite_file, suite_digest, data_digests = _suite_inputs(profile.eval.suite, cache)
    _check_profile_gates(profile, profile.eval.suite)
    plan = build_plan(
        source,
        cache.content_hash(source),
        out,
        profile=profile,
        suite=profile.eval.suite,
        suite_file=suite_file,
        suite_digest=suite_digest,
        data_digests=data_digests,
        versions=package_versions(),
        variants=variants,
        select=select,
    )
    return plan, run_preflight(plan, cache)


# --- the steps --------------------------------------------------------------------------


def describe(step: PlannedStep, plan: Plan) -> str:
    """Return what a step does, in words, for progress output."""
    if step.kind == "convert":
        return f"convert {plan.source.name} to ONNX {step.parameters['dtype']} (exporter {step.parameters['exporter']})"
    if step.kind == "quantize":
        q = step.parameters["quantization"]
        if q["method"] == "int8" and q["mode"] == "dynamic":
            method_text = "int8 dynamic" + (" per channel" if q.get("per_channel") else "")
        elif q["method"] == "int8":
            method_text = f"int8 weight-only, block {q['block_size']}"
        else:
            method_text = f"int4, block {q['block_size']}"
        head = f", {q['head_bits']}-bit head" if q.get("head_bits") else ""
        return f"quantize to {method_text}{head}"
    return f"evaluate {step.variant} with suite {plan.suite}"


def variant_profile(profile: Profile, variant: PlannedVariant) -> Profile:
    """Return the profile with the variant's quantization as its recipe's, so the quantizer
    reads every parameter (algorithm, head bits, embeddings) from one place."""
    recipe = profile.recipe.model_copy(update={"quantization": variant.quantization})
    return profile.model_copy(update={"recipe": recipe})


def _run_convert(plan: Plan, out: Path) -> dict[str, Any]:
    from llmctl.convert import convert

    recipe = plan.profile.recipe
    result = convert(str(plan.source), out, profile=plan.profile, exporter=recipe.exporter, dtype=recipe.dtype)
    return {"summary": _plain(getattr(result, "summary", None))}


def _run_quantize(plan: Plan, variant: PlannedVariant, model_dir: Path, out: Path) -> dict[str, Any]:
    from llmctl.quantize import quantize

    assert variant.quantization is not None
    # Every parameter comes from the variant's recipe, none as an explicit option, so the
    # options a method ignores (per-channel for int4, say) are not rejected as misplaced.
    result = quantize(model_dir, out, profile=variant_profile(plan.profile, variant))
    return {"summary": _plain(getattr(result, "summary", None))}


def _run_eval(plan: Plan, model_dir: Path, reference: Path, out: Path) -> dict[str, Any]:
    """Evaluate ``model_dir`` with the plan's suite and gates into ``out/results.json``."""
    from llmctl.eval import EvalOptions, run_eval

    options = EvalOptions(
        target=model_dir,
        profile=str(write_profile(plan)),
        suite=str(plan.suite_file),
        reference=reference,
        threads=plan.profile.runtime.threads,
        output=out / RESULTS_NAME,
    )
    run = run_eval(options)
    gates = run.document.get("gates", [])
    return {"gates_passed": sum(1 for g in gates if g.get("outcome") == "pass"), "gates": len(gates)}


def write_profile(plan: Plan) -> Path:
    """Write the plan's profile as YAML under the cache, for steps that take a profile file."""
    import yaml

    path = plan.out / CACHE_DIR / "profile.yaml"
    text = yaml.safe_dump(plan.profile.model_dump(mode="json", exclude_none=True), sort_keys=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    return path


def _plain(value: Any) -> Any:
    """Return ``value`` as JSON-ready data (dataclasses and pydantic models included)."""
    import dataclasses

    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class Runner:
    """Executes a plan step by step against the cache, reporting progress through ``on_event``."""

    def __init__(self, plan: Plan, on_event: EventHook | None = None) -> None:
        self.plan = plan
        self.cache = StepCache(plan.out / CACHE_DIR)
        self.on_event = on_event or (lambda event: None)
        self.records: list[StepRecord] = []

    def step(self, step: PlannedStep, work: Callable[[Path], dict[str, Any]]) -> Path:
        """Run ``work`` into the step's output folder unless the cache has it, and return the output.

        Raises:
            LlmctlError: whatever the step raised; the cache entry is left without a marker.
        """
        action = describe(step, self.plan)
        output = self.cache.output(step)
        if self.cache.is_done(step):
            self.on_event(StepEvent(step.label, "cached", action))
            self.records.append(StepRecord(step.label, step.key, "cached", 0.0, output))
            return output

        self.on_event(StepEvent(step.label, "start", action))
        self.cache.prepare(step)
        started = time.perf_counter()
        try:
            record = work(output)
        except LlmctlError as error:
            elapsed = time.perf_counter() - started
            self.on_event(StepEvent(step.label, "failed", action, elapsed, error.message.splitlines()[0]))
            self.records.append(StepRecord(step.label, step.key, "failed", elapsed))
            raise
        elapsed = time.perf_counter() - started
        self.cache.complete(step, {"duration_s": round(elapsed, 3), **record})
        logger.info("%s finished in %.1f s", step.label, elapsed)
        self.on_event(StepEvent(step.label, "done", action, elapsed))
        self.records.append(StepRecord(step.label, step.key, "built", elapsed, output))
        return output

    def convert(self) -> Path:
        return self.step(self.plan.convert, lambda out: _run_convert(self.plan, out))

    def build(self, variant: PlannedVariant, converted: Path) -> Path:
        if variant.build is self.plan.convert:
            return converted
        return self.step(variant.build, lambda out: _run_quantize(self.plan, variant, converted, out))

    def evaluate(self, variant: PlannedVariant, model_dir: Path, converted: Path) -> Path:
        # The unquantized variant is compared with itself too, so every variant reports parity
        # and a parity gate never fails it for lack of a measurement.
        def work(out: Path) -> dict[str, Any]:
            with atomic_output(out) as staging:
                return _run_eval(self.plan, model_dir, converted, staging)

        return self.step(variant.evaluate, work) / RESULTS_NAME


# --- linking the outputs ----------------------------------------------------------------


def _replace_symlink(link: Path, target: str) -> None:
    staging = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    staging.unlink(missing_ok=True)
    os.symlink(target, staging)
    os.replace(staging, link)


def link_variants(out: Path, built: dict[str, Path]) -> dict[str, Path]:
    """Point ``out/variants/NAME`` at each variant's cached artifact and drop links of other variants.

    Links are relative, so the pipeline folder can be moved or copied as a whole.
    """
    folder = out / VARIANTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.is_symlink() and stale.name not in built:
            stale.unlink()
    links = {}
    for name, artifact in built.items():
        link = folder / name
        if link.exists() and not link.is_symlink():
            raise UsageError(f"{link} exists and is not a link made by llmctl pipeline", hint="move it away and rerun")
        _replace_symlink(link, os.path.relpath(artifact, folder))
        links[name] = link
    return links


def link_selected(out: Path, name: str | None) -> None:
    """Point ``out/selected`` at the chosen variant, or remove it when none passed."""
    link = out / SELECTED_NAME
    if name is None:
        if link.is_symlink() or link.is_file():
            link.unlink()
        return
    _replace_symlink(link, f"{VARIANTS_DIR}/{name}")


# --- the whole run ----------------------------------------------------------------------


def run_pipeline(
    source: Path,
    out: Path,
    *,
    profile: Profile,
    variants: list[str] | None = None,
    select: str | None = None,
    dry_run: bool = False,
    on_event: EventHook | None = None,
) -> PipelineResult:
    """Build, evaluate and select model variants for the profile's hardware.

    Args:
        source: a Hugging Face checkpoint folder or a GGUF file.
        out: the pipeline folder: ``cache/``, ``variants/NAME``, ``selected`` and the reports.
        profile: the hardware profile; its recipe lists the variants and the selection rule.
        variants: names that narrow the profile's variants; None builds all.
        select: selection rule overriding the profile's (cheapest, smallest, fastest, best-quality).
        dry_run: stop after planning and the pre-flight checks.
        on_event: called at the start and end of every step.

    Returns:
        The plan, the pre-flight report and, unless ``dry_run``, every variant's outcome and
        the selected variant (None when no variant passed every gate).

    Raises:
        UsageError: bad options, a failed pre-flight check, or an unusable source or suite.
        ConversionError: the shared convert step failed.
    """
    started = time.perf_counter()
    created = not Path(out).exists()
    runner: Runner | None = None
    try:
        plan, preflight = plan_pipeline(source, out, profile=profile, variants=variants, select=select, dry_run=dry_run)
        result = PipelineResult(plan, preflight, dry_run=dry_run)
        if dry_run:
            return result
        preflight.raise_for_failures()

        with locked(plan.out):
            runner = Runner(plan, on_event)
            result.variants = execute(plan, runner)
            result.steps = runner.records

            chosen = select_variant(result.variants, plan.select)
            result.selected = chosen.name if chosen else None
            link_selected(plan.out, result.selected)
            result.duration_s = time.perf_counter() - started

            from llmctl.pipeline.report import write_reports

            result.reports = write_reports(result)
    except UsageError:
        # An input or option error before any step finished: remove the folder this run
        # created, which then contains only its lock file and memo of input hashes.
        if created and (runner is None or not any(record.status == "built" for record in runner.records)):
            _remove_created_folder(Path(out))
        raise
    return result


def _remove_created_folder(out: Path) -> None:
    """Remove a pipeline folder that contains only what this run wrote before it failed."""
    import shutil

    if out.is_dir() and not out.is_symlink() and {p.name for p in out.iterdir()} <= {LOCK_NAME, CACHE_DIR}:
        shutil.rmtree(out, ignore_errors=True)


def execute(plan: Plan, runner: Runner) -> list[VariantOutcome]:
    """Run every step of ``plan`` and return one outcome per variant.

    A variant whose quantization or evaluation fails is marked failed with the reason, and the
    other variants go on. A failed convert stops the run because every variant needs it.
    """
    from llmctl.pipeline.outcome import collect_outcome

    converted = runner.convert()
    outcomes = {v.name: VariantOutcome(v.name, v.quantization.model_dump(mode="json") if v.quantization else None)
                for v in plan.variants}

    built: dict[str, Path] = {}
    for variant in plan.variants:
        try:
            built[variant.name] = runner.build(variant, converted)
        except UsageError:
            raise
        except LlmctlError as error:
            outcomes[variant.name].error = f"{variant.build.kind} failed: {error.message.splitlines()[0]}"
    links = link_variants(plan.out, built)

    for variant in plan.variants:
        if variant.name not in built:
            continue
        outcome = outcomes[variant.name]
        outcome.path = links[variant.name]
        outcome.size_bytes = folder_bytes(built[variant.name])
        try:
            outcome.results_path = runner.evaluate(variant, built[variant.name], converted)
        except UsageError:
            raise
        except LlmctlError as error:
            outcome.error = f"eval failed: {error.message.splitlines()[0]}"
            continue
        collect_outcome(outcome, plan, variant)
    return list(outcomes.values())
