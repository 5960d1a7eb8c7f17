"""The pipeline plan: which variants to build and the steps that build and evaluate them.

Every step has a cache key, the sha256 of what it reads (the source's content hash or the
keys of the steps before it), its parameters and the versions of the tools that run it. A
step whose key is unchanged is reused. A changed parameter changes the key of that step and
of every step after it, and of nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmctl.errors import InputError, UsageError
from llmctl.profiles.schema import Profile, Quantization, Variant

StepKind = Literal["convert", "quantize", "eval"]
SELECT_RULES = ("cheapest", "smallest", "fastest", "best-quality")

# Bumped when the meaning of a cached step output changes, so old caches are not reused.
CACHE_FORMAT = 1


@dataclass
class PlannedStep:
    """One unit of work and its cache key.

    Attributes:
        kind: convert, quantize or eval.
        variant: the variant the step belongs to; None for the shared convert step.
        parameters: everything that changes the step's output besides its inputs.
        inputs: content hashes or upstream step keys the step reads.
        key: sha256 over kind, parameters, inputs and tool versions.
    """

    kind: StepKind
    variant: str | None
    parameters: dict[str, Any]
    inputs: list[str]
    key: str

    @property
    def label(self) -> str:
        """Name shown in progress output, e.g. ``quantize int4-b32``."""
        return self.kind if self.variant is None else f"{self.kind} {self.variant}"

    @property
    def cache_name(self) -> str:
        """Folder name of the step's cache entry."""
        return f"{self.kind}-{self.key[:16]}"


@dataclass
class PlannedVariant:
    """A candidate model and the steps that produce and evaluate it."""

    name: str
    quantization: Quantization | None
    build: PlannedStep
    evaluate: PlannedStep

    @property
    def precision(self) -> str:
        """The weight precision the cost model is asked about: int4, int8 or the float dtype."""
        return self.quantization.method if self.quantization else str(self.build.parameters.get("dtype", "fp32"))


@dataclass
class Plan:
    """The source, profile, suite and ordered steps of one pipeline run."""

    source: Path
    source_digest: str
    profile: Profile
    out: Path
    suite: str
    suite_file: Path
    select: str
    convert: PlannedStep
    variants: list[PlannedVariant]
    versions: dict[str, str] = field(default_factory=dict)

    def steps(self) -> list[PlannedStep]:
        """Return every step in execution order, without duplicates (an unquantized variant reuses convert)."""
        ordered = [self.convert]
        for variant in self.variants:
            if variant.build is not self.convert:
                ordered.append(variant.build)
        ordered.extend(variant.evaluate for variant in self.variants)
        return ordered

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as JSON-ready data."""
        return {
            "source": str(self.source),
            "source_sha256": self.source_digest,
            "profile": self.profile.name,
            "output": str(self.out),
            "suite": self.suite,
            "select": self.select,
            "variants": [
                {
                    "name": variant.name,
                    "quantization": variant.quantization.model_dump(mode="json") if variant.quantization else None,
                }
                for variant in self.variants
            ],
            "steps": [
                {"step": step.label, "kind": step.kind, "key": step.key, "parameters": step.parameters}
                for step in self.steps()
            ],
            "versions": self.versions,
        }


def step_key(kind: str, parameters: dict[str, Any], inputs: list[str], versions: dict[str, str]) -> str:
    """Return the cache key of a step: sha256 of its canonical JSON description."""
    description = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "parameters": parameters,
        "inputs": inputs,
        "versions": versions,
    }
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def profile_variants(profile: Profile) -> list[Variant]:
    """Return the profile's candidate variants.

    A profile without a ``recipe.variants`` list has one candidate: its ``recipe.quantization``,
    named after the method.
    """
    if profile.recipe.variants:
        return list(profile.recipe.variants)
    return [Variant(name=profile.recipe.quantization.method, quantization=profile.recipe.quantization)]


def narrow_variants(available: list[Variant], requested: list[str] | None, profile_name: str) -> list[Variant]:
    """Keep the variants named in ``requested`` (in the profile's order); None keeps all.

    Raises:
        UsageError: a requested name is not a variant of the profile, or the list is empty.
    """
    if requested is None:
        return available
    names = [name.strip() for name in requested if name.strip()]
    if not names:
        raise UsageError("--variants is empty", hint="pass one or more variant names separated by commas")
    known = {variant.name for variant in available}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(
            f"unknown variant {', '.join(repr(n) for n in unknown)} for profile {profile_name!r}",
            hint=f"variants of this profile: {', '.join(v.name for v in available)}",
        )
    return [variant for variant in available if variant.name in names]


def check_select_rule(rule: str) -> str:
    """Return ``rule`` when it is a known selection rule.

    Raises:
        UsageError: the rule is not one of ``SELECT_RULES``.
    """
    if rule not in SELECT_RULES:
        raise UsageError(f"unknown selection rule {rule!r}", hint=f"choose one of: {', '.join(SELECT_RULES)}")
    return rule


def convert_parameters(profile: Profile) -> dict[str, Any]:
    """Return the parameters of the convert step taken from the profile's recipe."""
    recipe = profile.recipe
    return {
        "exporter": recipe.exporter,
        "dtype": recipe.dtype,
        "tolerance": recipe.convert_tolerance.model_dump(mode="json"),
    }


def quantize_parameters(profile: Profile, quantization: Quantization) -> dict[str, Any]:
    """Return the parameters of one variant's quantize step."""
    return {
        "quantization": quantization.model_dump(mode="json"),
        "tolerance": profile.recipe.quantize_tolerance.model_dump(mode="json"),
    }


def eval_parameters(profile: Profile, suite: str, suite_digest: str, data_digests: dict[str, str]) -> dict[str, Any]:
    """Return the parameters of one variant's eval step: suite, its data, gates and runtime settings."""
    return {
        "suite": suite,
        "suite_sha256": suite_digest,
        "data_sha256": data_digests,
        "profile_gates": list(profile.eval.gates),
        "execution_provider": profile.runtime.execution_provider,
        "threads": profile.runtime.threads,
        "hardware": profile.hardware.name,
    }


def build_plan(
    source: Path,
    source_digest: str,
    out: Path,
    *,
    profile: Profile,
    suite: str,
    suite_file: Path,
    suite_digest: str,
    data_digests: dict[str, str],
    versions: dict[str, str],
    variants: list[str] | None = None,
    select: str | None = None,
) -> Plan:
    """Lay out the steps of a pipeline run and compute their cache keys.

    Args:
        source: the checkpoint folder or GGUF file.
        source_digest: content hash of the source.
        out: the pipeline output folder.
        profile: the validated hardware profile.
        suite: the suite name or file as given.
        suite_file: the suite file it resolved to.
        suite_digest: sha256 of the suite file.
        data_digests: content hash of each data file the suite reads, by path.
        versions: tool versions that enter every key.
        variants: names that narrow the profile's variants; None keeps all.
        select: selection rule; None uses the profile's.

    Raises:
        UsageError: an unknown variant name or selection rule.
    """
    rule = check_select_rule(select or profile.recipe.select)
    chosen = narrow_variants(profile_variants(profile), variants, profile.name)

    convert_params = convert_parameters(profile)
    convert = PlannedStep(
        "convert", None, convert_params, [source_digest], step_key("convert", convert_params, [source_digest], versions)
    )
    eval_params = eval_parameters(profile, suite, suite_digest, data_digests)

    planned = []
    for variant in chosen:
        if variant.quantization is None:
            build = convert
        else:
            params = quantize_parameters(profile, variant.quantization)
            build = PlannedStep("quantize", variant.name, params, [convert.key], step_key("quantize", params, [convert.key], versions))
        # Parity is measured against the converted, unquantized model, so eval reads both.
        eval_inputs = [build.key, convert.key]
        evaluate = PlannedStep("eval", variant.name, eval_params, eval_inputs, step_key("eval", eval_params, eval_inputs, versions))
        planned.append(PlannedVariant(variant.name, variant.quantization, build, evaluate))

    return Plan(
        source=source,
        source_digest=source_digest,
        profile=profile,
        out=out,
        suite=suite,
        suite_file=suite_file,
        select=rule,
        convert=convert,
        variants=planned,
        versions=versions,
    )


def check_source(source: Path) -> Path:
    """Return ``source`` when it is a checkpoint folder or a GGUF file.

    Raises:
        InputError: the path does not exist, or is neither a folder with ``config.json`` nor a ``.gguf`` file.
    """
    if not source.exists():
        raise InputError(f"source {source} not found", hint="pass a Hugging Face checkpoint folder or a .gguf file")
    if source.is_file() and source.suffix.lower() != ".gguf":
        raise InputError(f"source {source} is not a .gguf file", hint="pass a Hugging Face checkpoint folder or a .gguf file")
    if source.is_dir() and not (source / "config.json").is_file():
        raise InputError(f"source folder {source} has no config.json", hint="pass a Hugging Face checkpoint folder")
    return source
