"""Fitting a profile's efficiency factors to a measured run.

Two shapes of measurement file are read:

* the results document of ``llmctl eval --output`` (schema version 1): the first ``speed``
  task that ran gives ``metrics.decode_tps.value``, ``metrics.prefill_tps.value`` and
  ``metrics.ttft_ms.value``, its ``details.prompt_tokens`` and ``details.output_tokens``,
  and the top-level ``profile.name`` names the profile it ran on;
* a minimal document for measurements taken elsewhere (``bench/cost_calibration.py`` writes
  it from ``llmctl serve`` timings)::

      {"profile": "detected-host", "model": "...",
       "speed": {"decode_tps": 95.0, "prefill_tps": 900.0, "ttft_ms": 120.0,
                 "prompt_tokens": 128, "output_tokens": 64}}

Only ``decode_tps`` is required; ``prefill_tps`` may be derived from ``ttft_ms`` and
``prompt_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.cost.estimate import WorkloadSpec, estimate_profile
from llmctl.cost.model_stats import ModelStats
from llmctl.errors import InputError
from llmctl.profiles.schema import Profile


@dataclass(frozen=True)
class SpeedMeasurement:
    """Speed figures of one measured run, with the profile it ran on."""

    source: str
    profile: str | None
    decode_tps: float
    prefill_tps: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None


def read_speed_measurement(path: Path) -> SpeedMeasurement:
    """Read the speed figures of an eval results file or of a minimal measurement file.

    Raises:
        InputError: missing or unreadable file, or no decode tokens/s in it.
    """
    if not path.is_file():
        raise InputError(f"{path}: file not found", hint="pass the results.json of llmctl eval --output")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON: {error}",
                         hint="pass the results.json written by llmctl eval --output") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}",
                         hint="pass the results.json written by llmctl eval --output")

    profile = data.get("profile")
    profile_name = profile.get("name") if isinstance(profile, dict) else profile
    speed = _speed_from_eval(data) if isinstance(data.get("tasks"), list) else data.get("speed")
    if not isinstance(speed, dict) or not _positive(speed.get("decode_tps")):
        raise InputError(
            f"{path}: no decode tokens/s measurement (speed.decode_tps, or a speed task in eval results)",
            hint="run llmctl eval with a suite that has a speed task, then pass its --output file",
        )
    prefill = speed.get("prefill_tps")
    ttft = speed.get("ttft_ms")
    prompt = speed.get("prompt_tokens")
    if not _positive(prefill) and _positive(ttft) and _positive(prompt):
        prefill = prompt / (ttft / 1000.0)
    output = speed.get("output_tokens")
    if isinstance(output, list):  # eval records the tokens generated per repeat
        output = max(output) if output else None
    return SpeedMeasurement(
        source=str(path), profile=str(profile_name) if profile_name else None,
        decode_tps=float(speed["decode_tps"]), prefill_tps=float(prefill) if _positive(prefill) else None,
        ttft_ms=float(ttft) if _positive(ttft) else None, prompt_tokens=int(prompt) if _positive(prompt) else None,
        output_tokens=int(output) if _positive(output) else None,
    )


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _speed_from_eval(data: dict[str, Any]) -> dict[str, Any] | None:
    for task in data["tasks"]:
        if not isinstance(task, dict) or task.get("type") != "speed" or task.get("status") != "ok":
            continue
        metrics = task.get("metrics") or {}
        details = task.get("details") or {}

        def value(name: str) -> Any:
            entry = metrics.get(name)
            return entry.get("value") if isinstance(entry, dict) else None

        return {"decode_tps": value("decode_tps"), "prefill_tps": value("prefill_tps"), "ttft_ms": value("ttft_ms"),
                "prompt_tokens": details.get("prompt_tokens"), "output_tokens": details.get("output_tokens")}
    return None


def calibrate_profile(
    stats: ModelStats, profile: Profile, measurement: SpeedMeasurement, *, quant: str | None = None
) -> tuple[Profile, dict[str, Any]]:
    """Replace ``profile``'s efficiency factors with those that reproduce ``measurement``.

    The measured run is re-estimated with the same prompt and output lengths and one stream.
    Each factor is refitted for the bound that limits it (decode by memory bandwidth, prefill
    by compute), keeping ``step_overhead_ms`` fixed; a factor that would pass 1 is capped at 1 and
    reported, since then the profile's bandwidth or peak is too low.

    Returns:
        The calibrated profile and a record with measured, estimated-before and
        estimated-after figures side by side.
    """
    workload = WorkloadSpec(
        prompt_tokens=measurement.prompt_tokens or profile.workload.prompt_tokens,
        output_tokens=measurement.output_tokens or profile.workload.output_tokens,
        concurrency=1, kv_cache_dtype=profile.workload.kv_cache_dtype,
    )
    before = estimate_profile(stats, profile, workload, quant=quant)
    if not before.fits:
        raise InputError(f"cannot calibrate {profile.name}: the model does not fit its memory")
    cm = profile.cost_model
    prefill_eff, decode_eff, notes = cm.prefill_efficiency, cm.decode_efficiency, []

    overhead = cm.step_overhead_ms / 1e3
    estimated_prefill = workload.prompt_tokens / (before.ttft_ms / 1000.0)
    if measurement.prefill_tps:
        prefill_eff, note = _refit(prefill_eff, before.ttft_ms / 1e3, workload.prompt_tokens / measurement.prefill_tps,
                                   overhead, "prefill_efficiency")
        notes += note
    measured_step, estimated_step = 1.0 / measurement.decode_tps, before.tpot_ms / 1e3
    if before.decode_bound == "memory":
        decode_eff, note = _refit(decode_eff, estimated_step, measured_step, overhead, "decode_efficiency")
    else:
        prefill_eff, note = _refit(prefill_eff, estimated_step, measured_step, overhead,
                                   "prefill_efficiency (decode is compute-bound)")
    notes += note

    calibrated = profile.model_copy(update={"cost_model": cm.model_copy(update={
        "prefill_efficiency": prefill_eff, "decode_efficiency": decode_eff,
        "calibrated_from": f"{measurement.source}: {measurement.decode_tps:.1f} decode tokens/s",
    })})
    after = estimate_profile(stats, calibrated, workload, quant=quant)
    record = {
        "profile": profile.name, "source": measurement.source,
        "workload": {"prompt_tokens": workload.prompt_tokens, "output_tokens": workload.output_tokens, "streams": 1},
        "measured": {"decode_tps": measurement.decode_tps, "prefill_tps": measurement.prefill_tps},
        "estimate_before": {"decode_tps": before.tokens_per_second_per_stream, "prefill_tps": estimated_prefill},
        "estimate_after": {"decode_tps": after.tokens_per_second_per_stream,
                           "prefill_tps": workload.prompt_tokens / (after.ttft_ms / 1000.0)},
        "efficiency_before": {"prefill": cm.prefill_efficiency, "decode": cm.decode_efficiency},
        "efficiency_after": {"prefill": prefill_eff, "decode": decode_eff},
        "notes": notes,
    }
    return calibrated, record


def _refit(efficiency: float, estimated_s: float, measured_s: float, overhead_s: float, name: str) -> tuple[float, list[str]]:
    """Return the efficiency that turns ``estimated_s`` into ``measured_s``, the fixed overhead kept.

    The bound's time is inversely proportional to its efficiency, so
    new = old x (estimated - overhead) / (measured - overhead), capped at 1.
    """
    if measured_s <= overhead_s:
        return 1.0, [f"{name}: the measured step is shorter than cost_model.step_overhead_ms; lower it"]
    value = efficiency * (estimated_s - overhead_s) / (measured_s - overhead_s)
    if value > 1.0:
        return 1.0, [f"{name} would be {value:.2f} > 1: the profile's peak or bandwidth is below what was measured"]
    return value, []
