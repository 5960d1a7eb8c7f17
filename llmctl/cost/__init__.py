"""``llmctl cost-estimate``: memory, speed and dollars of a model on hardware profiles.

Only the model's configuration is read, never its weights, and nothing here imports torch
or transformers, so an estimate takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmctl.cost.estimate import CostReport, Targets, WorkloadSpec, estimate_costs
from llmctl.errors import ProfileError, UsageError
from llmctl.profiles.schema import Profile

__all__ = ["CostRequest", "CostReport", "Targets", "WorkloadSpec", "cost_estimate", "targets_for", "workload_for"]


@dataclass
class CostRequest:
    """Everything ``cost_estimate`` needs; None means "take the profile's default".

    Attributes:
        model: model folder, config.json, .gguf file or hub id.
        profiles: built-in names or YAML files; empty means the default profile.
        all_profiles: add every built-in profile.
        quant: weight precision (fp32, fp16, bf16, int8, int4); None is each profile's recipe.
        calibrate: eval results (or minimal measurement) file whose speed replaces the
            efficiency factors of the profile it names.
    """

    model: str
    profiles: list[str] = field(default_factory=list)
    all_profiles: bool = False
    quant: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    concurrency: int | None = None
    requests_per_second: float | None = None
    tokens_per_day: float | None = None
    context: int | None = None
    kv_cache_dtype: str | None = None
    calibrate: Path | None = None
    max_ttft_ms: float | None = None
    min_tokens_per_second: float | None = None
    price_per_hour: float | None = None


def cost_estimate(request: CostRequest) -> CostReport:
    """Estimate memory, speed and cost of ``request.model`` on the chosen profiles.

    Each profile is estimated with its own ``workload`` settings (token counts, load, KV
    cache dtype, latency targets); a setting given in the request replaces it on every
    profile. A row therefore does not depend on which other profiles are listed.

    Raises:
        InputError: the model configuration cannot be read or lacks a field.
        ProfileError: a profile is unknown or invalid, or the calibration names a profile
            that cannot be found.
        UsageError: conflicting or impossible workload options.
    """
    from llmctl.cost.model_config import load_model_config
    from llmctl.cost.model_stats import model_stats

    loads = [request.concurrency, request.requests_per_second, request.tokens_per_day]
    if sum(v is not None for v in loads) > 1:
        raise UsageError("--concurrency, --requests-per-second and --tokens-per-day exclude each other",
                         hint="give one load measure")
    stats = model_stats(load_model_config(request.model))
    profiles, notes = _select_profiles(request)

    calibrations = []
    if request.calibrate is not None:
        profiles, record = _apply_calibration(stats, profiles, request)
        calibrations.append(record)
    workloads = [workload_for(profile, request) for profile in profiles]
    targets = [targets_for(profile, request) for profile in profiles]
    report = estimate_costs(stats, profiles, workloads, quant=request.quant, targets=targets,
                            price_per_hour=request.price_per_hour)
    report.notes = notes + report.notes
    report.calibrations = calibrations
    return report


def workload_for(profile: Profile, request: CostRequest) -> WorkloadSpec:
    """Return ``profile``'s default workload with the settings given in ``request`` applied.

    A load measure in the request (concurrency, requests/s or tokens/day) replaces the
    profile's concurrency.
    """
    defaults = profile.workload
    loads = (request.concurrency, request.requests_per_second, request.tokens_per_day)
    return WorkloadSpec(
        prompt_tokens=_pick(request.prompt_tokens, defaults.prompt_tokens),
        output_tokens=_pick(request.output_tokens, defaults.output_tokens),
        concurrency=defaults.concurrency if all(v is None for v in loads) else request.concurrency,
        requests_per_second=request.requests_per_second, tokens_per_day=request.tokens_per_day,
        context=_pick(request.context, defaults.context),
        kv_cache_dtype=request.kv_cache_dtype or defaults.kv_cache_dtype,
    )


def targets_for(profile: Profile, request: CostRequest) -> Targets:
    """Return ``profile``'s latency targets with the ones given in ``request`` applied."""
    return Targets(
        max_ttft_ms=_pick(request.max_ttft_ms, profile.workload.max_ttft_ms),
        min_tokens_per_second=_pick(request.min_tokens_per_second, profile.workload.min_tokens_per_second),
    )


def _pick(value, default):
    return default if value is None else value


def _select_profiles(request: CostRequest) -> tuple[list[Profile], list[str]]:
    """Load the chosen profiles once each, in order, with notes about names that added nothing."""
    from llmctl.profiles import builtin_profile_names, load_profile

    notes = []
    names = list(request.profiles)
    if request.all_profiles:
        builtins = builtin_profile_names()
        redundant = [n for n in names if n in builtins]
        if redundant:
            notes.append(f"--all-profiles already includes {', '.join(redundant)}; --profile adds only profiles that are not built in")
        names = builtins + [n for n in names if n not in builtins]
    if not names:
        return [load_profile(None)], notes
    profiles = [load_profile(name) for name in names]
    seen: dict[str, Profile] = {}
    for profile in profiles:
        seen.setdefault(profile.name, profile)
    return list(seen.values()), notes


def _apply_calibration(stats, profiles: list, request: CostRequest) -> tuple[list, dict]:
    from llmctl.cost.calibrate import calibrate_profile, read_speed_measurement
    from llmctl.profiles import load_profile

    assert request.calibrate is not None
    measurement = read_speed_measurement(request.calibrate)
    if measurement.profile is None:
        raise ProfileError(f"{request.calibrate}: the measurement does not name the profile it ran on",
                           hint="add \"profile\": NAME to the file")
    index = next((i for i, p in enumerate(profiles) if p.name == measurement.profile), None)
    if index is None:
        try:
            profiles = [*profiles, load_profile(measurement.profile)]
        except ProfileError:
            raise ProfileError(
                f"{request.calibrate}: measured on profile {measurement.profile!r}, which is not among the chosen ones",
                hint=f"pass --profile with the YAML file of {measurement.profile}",
            ) from None
        index = len(profiles) - 1
    calibrated, record = calibrate_profile(stats, profiles[index], measurement, quant=request.quant)
    profiles = list(profiles)
    profiles[index] = calibrated
    return profiles, record
