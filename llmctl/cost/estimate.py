"""Memory, speed and dollars of serving a model on each hardware profile.

The model is a roofline estimate. Prefill is bounded by compute: about 2 FLOPs per parameter
per token plus the attention products, against the profile's peak for the dtype the matrix
products run in. Decode is bounded by memory traffic: each step reads the weights once for
the whole batch plus every sequence's KV cache, against the profile's bandwidth. Batching
raises decode throughput until the step's compute catches up with its memory time. Each
bound is divided by an efficiency factor from the profile's ``cost_model`` (or measured by
``llmctl cost-estimate --calibrate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llmctl.cost.model_stats import PRECISIONS, ModelStats
from llmctl.errors import UsageError
from llmctl.profiles.schema import Profile

KV_CACHE_DTYPES = ("fp32", "fp16", "bf16", "int8")
HOURS_PER_MONTH = 730.0  # 8,760 hours a year / 12
SECONDS_PER_DAY = 86_400.0


def _check_positive(option: str, value: float | None, *, hint: str) -> None:
    """Raise UsageError naming ``option`` unless ``value`` is None or a finite number above 0."""
    if value is None:
        return
    if not value > 0:  # also catches nan
        raise UsageError(f"{option} must be greater than 0, got {value:g}", hint=hint)
    if not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number, got {value:g}", hint=hint)


@dataclass(frozen=True)
class WorkloadSpec:
    """Served workload: request shape and load. Exactly one load measure is set.

    Attributes:
        prompt_tokens: input tokens per request.
        output_tokens: generated tokens per request.
        concurrency: streams generating at the same time.
        requests_per_second: arrival rate; converted to streams with Little's law.
        tokens_per_day: input plus output tokens per day; converted to a request rate.
        context: KV-cache length reserved per stream; None is prompt + output tokens.
        kv_cache_dtype: precision of the KV cache.
    """

    prompt_tokens: int
    output_tokens: int
    concurrency: int | None = None
    requests_per_second: float | None = None
    tokens_per_day: float | None = None
    context: int | None = None
    kv_cache_dtype: str = "fp16"

    def __post_init__(self) -> None:
        checks = {
            "--prompt-tokens": self.prompt_tokens, "--output-tokens": self.output_tokens,
            "--concurrency": self.concurrency, "--requests-per-second": self.requests_per_second,
            "--tokens-per-day": self.tokens_per_day, "--context": self.context,
        }
        for option, value in checks.items():
            _check_positive(option, value, hint="workloads need positive numbers")
        loads = [v for v in (self.concurrency, self.requests_per_second, self.tokens_per_day) if v is not None]
        if len(loads) != 1:
            raise UsageError("set exactly one of --concurrency, --requests-per-second and --tokens-per-day")
        if self.context is not None and self.context < self.prompt_tokens + self.output_tokens:
            raise UsageError(
                f"--context {self.context} is shorter than prompt + output tokens "
                f"({self.prompt_tokens + self.output_tokens})",
                hint="raise --context or lower the token counts",
            )

    @property
    def kv_length(self) -> int:
        return self.context or self.prompt_tokens + self.output_tokens

    @property
    def request_rate(self) -> float | None:
        """Requests per second for rate-based workloads, None for a fixed concurrency."""
        if self.requests_per_second is not None:
            return self.requests_per_second
        if self.tokens_per_day is not None:
            return self.tokens_per_day / SECONDS_PER_DAY / (self.prompt_tokens + self.output_tokens)
        return None


    def to_dict(self) -> dict[str, Any]:
        """Return the workload as plain data, with the derived KV length and request rate."""
        return {**asdict(self), "kv_length": self.kv_length, "requests_per_second": self.request_rate}


@dataclass(frozen=True)
class Targets:
    """Latency targets a profile must meet to be recommended; None means "not checked"."""

    max_ttft_ms: float | None = None
    min_tokens_per_second: float | None = None

    def __post_init__(self) -> None:
        checks = {"--max-ttft-ms": self.max_ttft_ms, "--min-tokens-per-second": self.min_tokens_per_second}
        for option, value in checks.items():
            _check_positive(option, value, hint="leave the option out to set no target")

    @property
    def any(self) -> bool:
        """Whether at least one target is set."""
        return self.max_ttft_ms is not None or self.min_tokens_per_second is not None


@dataclass
class ProfileEstimate:
    """Every figure of one profile's estimate, with the assumptions behind it."""

    profile: str
    hardware: str
    kind: str
    precision: str
    fits: bool
    memory_gb: float
    weights_gb: float
    kv_bytes_per_sequence: int
    memory_needed_gb: float
    shortfall_gb: float
    max_batch: int
    batch: int = 0
    instances: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    tokens_per_second_per_stream: float | None = None
    tokens_per_second_per_instance: float | None = None
    decode_bound: str | None = None
    usd_per_hour_per_instance: float | None = None
    usd_per_hour: float | None = None
    usd_per_month: float | None = None
    usd_per_million_input_tokens: float | None = None
    usd_per_million_output_tokens: float | None = None
    usd_per_million_tokens: float | None = None
    meets_targets: bool = False
    problems: list[str] = field(default_factory=list)
    workload: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- precision and dtype choices ----------------------------------------------------------------


def resolve_precision(profile: Profile, quant: str | None) -> dict[str, Any]:
    """Choose the weight precision and the dtype the matrix products run in.

    Args:
        profile: the target.
        quant: fp32, fp16, bf16, int8 or int4; None takes the profile recipe's method.

    Returns:
        precision, float dtype, quantization parameters and the compute dtype.

    Raises:
        UsageError: unknown precision.
    """
    recipe = profile.recipe
    precision = quant or recipe.quantization.method
    if precision not in PRECISIONS:
        raise UsageError(f"--quant {precision!r} is not a known precision", hint=f"choose one of: {', '.join(PRECISIONS)}")
    float_dtype = recipe.dtype if precision in {"int8", "int4"} else precision
    quantization = recipe.quantization
    peaks = profile.hardware.peak_tflops
    if precision in {"fp32", "fp16", "bf16"}:
        compute = precision
    elif precision == "int8" and quantization.mode == "dynamic":
        compute = "int8"
    elif profile.hardware.kind == "cpu" and quantization.accuracy_level == 4:
        # MatMulNBits with accuracy level 4 quantizes activations to int8 and runs int8 dot products.
        compute = "int8"
    else:
        compute = float_dtype
    compute_used = compute if compute in peaks else "fp32"
    return {
        "precision": precision,
        "float_dtype": float_dtype,
        "block_size": quantization.block_size,
        "symmetric": quantization.symmetric,
        "int8_mode": quantization.mode,
        "quantize_embeddings": quantization.quantize_embeddings,
        "head_bits": quantization.head_bits,
        "compute_dtype": compute_used,
        "compute_dtype_note": None if compute_used == compute else f"no {compute} peak in the profile; used fp32",
    }


# --- the estimate --------------------------------------------------------------------------------


def estimate_profile(
    stats: ModelStats,
    profile: Profile,
    workload: WorkloadSpec,
    *,
    quant: str | None = None,
    targets: Targets | None = None,
    price_per_hour: float | None = None,
) -> ProfileEstimate:
    """Estimate memory, latency, throughput and cost of ``stats`` on ``profile``.

    Args:
        stats: the model's sizes.
        profile: the target; its ``cost_model`` supplies efficiencies and overhead.
        workload: request shape and load.
        quant: weight precision; None uses the profile recipe's.
        targets: latency targets to check.
        price_per_hour: hourly price used when the profile has none.

    Returns:
        The estimate; a model that does not fit has ``fits`` False and its shortfall.
    """
    targets = targets or Targets()
    choice = resolve_precision(profile, quant)
    hardware, cost_model = profile.hardware, profile.cost_model
    weights = stats.weight_bytes(
        choice["precision"], float_dtype=choice["float_dtype"], block_size=choice["block_size"],
        symmetric=choice["symmetric"], int8_mode=choice["int8_mode"],
        quantize_embeddings=choice["quantize_embeddings"], head_bits=choice["head_bits"],
    )
    kv_sequence = stats.kv_bytes_for_sequence(workload.kv_length, workload.kv_cache_dtype)
    overhead = cost_model.runtime_overhead_gb * 1e9
    memory = hardware.memory_gb * 1e9
    max_batch = max(0, math.floor((memory - weights.total - overhead) / kv_sequence))
    needed_one = weights.total + overhead + kv_sequence

    result = ProfileEstimate(
        profile=profile.name, hardware=hardware.name, kind=hardware.kind, precision=choice["precision"],
        fits=max_batch >= 1, memory_gb=hardware.memory_gb, weights_gb=weights.total / 1e9,
        kv_bytes_per_sequence=kv_sequence, memory_needed_gb=needed_one / 1e9,
        shortfall_gb=max(0.0, (needed_one - memory) / 1e9), max_batch=max_batch,
        workload=workload.to_dict(), targets=asdict(targets),
    )
    result.assumptions = _assumptions(stats, profile, workload, choice, weights)
    if not result.fits:
        result.problems.append(
            f"does not fit: needs {needed_one / 1e9:.2f} GB for one stream, has {hardware.memory_gb:g} GB "
            f"(short by {result.shortfall_gb:.2f} GB)"
        )
        return result

    speed = SpeedModel(stats, profile, workload, weights.total, choice["compute_dtype"])
    _size_deployment(result, speed, workload, profile)
    _price(result, speed, workload, profile, price_per_hour)
    _check_targets(result, targets)
    return result


@dataclass
class SpeedModel:
    """Roofline timings of one instance for a given model, profile and workload."""

    stats: ModelStats
    profile: Profile
    workload: WorkloadSpec
    weight_bytes: int
    compute_dtype: str

    @property
    def peak_flops(self) -> float:
        return self.profile.hardware.peak_tflops[self.compute_dtype] * 1e12

    @property
    def bandwidth(self) -> float:
        return self.profile.hardware.memory_bandwidth_gbps * 1e9

    def flops_per_token(self, context: float) -> float:
        return 2.0 * self.stats.compute_params_per_token() + self.stats.attention_flops_per_token(int(context))

    def prefill_seconds(self) -> float:
        """Time to first token: the prompt's FLOPs, but never less than one read of the weights."""
        prompt = self.workload.prompt_tokens
        cm = self.profile.cost_model
        compute = prompt * self.flops_per_token(prompt / 2) / (self.peak_flops * cm.prefill_efficiency)
        memory = self.weight_bytes * self.stats.decode_read_fraction(1) / (self.bandwidth * cm.decode_efficiency)
        return max(compute, memory) + cm.step_overhead_ms / 1e3

    def decode_step(self, batch: int) -> tuple[float, str]:
        """Seconds of one decode step for ``batch`` streams and which bound sets it."""
        cm = self.profile.cost_model
        context = self.workload.prompt_tokens + self.workload.output_tokens / 2
        kv_read = batch * self.stats.kv_bytes_for_sequence(int(context), self.workload.kv_cache_dtype)
        weights_read = self.weight_bytes * self.stats.decode_read_fraction(batch)
        memory = (weights_read + kv_read) / (self.bandwidth * cm.decode_efficiency)
        compute = batch * self.flops_per_token(context) / (self.peak_flops * cm.prefill_efficiency)
        overhead = cm.step_overhead_ms / 1e3
        return (memory + overhead, "memory") if memory >= compute else (compute + overhead, "compute")

    def request_seconds(self, batch: int) -> float:
        """Wall time of one request: prefill, then its output tokens at the batch's step time."""
        return self.prefill_seconds() + self.workload.output_tokens * self.decode_step(batch)[0]

    def instance_seconds_per_request(self, batch: int) -> float:
        """Instance time one request uses when ``batch`` streams share each decode step."""
        return self.prefill_seconds() + self.workload.output_tokens * self.decode_step(batch)[0] / batch


def _size_deployment(result: ProfileEstimate, speed: SpeedModel, workload: WorkloadSpec, profile: Profile) -> None:
    """Choose streams per instance and the number of instances for the workload."""
    capacity = max(1, min(result.max_batch, profile.serve.max_concurrency))
    rate = workload.request_rate
    if rate is None:
        streams = float(workload.concurrency or 1)
        instances = math.ceil(streams / capacity)
        batch = max(1, min(capacity, math.ceil(streams / instances)))
    else:
        instances, batch = _instances_for_rate(speed, rate, capacity)
        streams = rate * speed.request_seconds(batch)

    step, bound = speed.decode_step(batch)
    result.batch, result.instances, result.decode_bound = batch, instances, bound
    result.ttft_ms = speed.prefill_seconds() * 1e3
    result.tpot_ms = step * 1e3
    result.tokens_per_second_per_stream = 1.0 / step
    result.tokens_per_second_per_instance = batch / step
    result.assumptions["streams"] = streams
    result.assumptions["streams_per_instance_limit"] = capacity


def _instances_for_rate(speed: SpeedModel, rate: float, capacity: int) -> tuple[int, int]:
    """Return the fewest instances, and the streams each runs, that keep up with ``rate`` requests/s.

    Per instance, Little's law gives the streams in flight, which set the batch, which sets
    the request time: iterate that to a fixed point. An instance keeps up when its busy time
    per second, prefill plus its share of the shared decode steps, stays at or below 1.
    """
    instances = max(1, math.ceil(rate * speed.instance_seconds_per_request(capacity)))
    while True:
        per_instance = rate / instances
        batch = 1
        for _ in range(50):
            wanted = max(1, math.ceil(per_instance * speed.request_seconds(batch) - 1e-9))
            if wanted > capacity or wanted == batch:
                break
            batch = wanted
        fits_memory = wanted <= capacity
        keeps_up = per_instance * speed.instance_seconds_per_request(batch) <= 1.0
        if fits_memory and keeps_up:
            return instances, batch
        instances = max(instances + 1, math.ceil(instances * 1.01))


def _price(result: ProfileEstimate, speed: SpeedModel, workload: WorkloadSpec, profile: Profile,
           price_override: float | None) -> None:
    price = profile.hardware.price
    hourly = price.usd_per_hour if price else price_override
    result.assumptions["price"] = (
        {"usd_per_hour": price.usd_per_hour, "source": price.source, "date": str(price.date)} if price
        else {"usd_per_hour": price_override, "source": "--price-per-hour"} if price_override is not None else None
    )
    if hourly is None:
        result.problems.append("no price: set hardware.price in the profile or pass --price-per-hour")
        return

    capacity = result.assumptions["streams_per_instance_limit"]
    full_step = speed.decode_step(capacity)[0]
    per_second = hourly / 3600.0
    result.usd_per_hour_per_instance = hourly
    result.usd_per_hour = hourly * result.instances
    result.usd_per_month = result.usd_per_hour * HOURS_PER_MONTH
    # At full load: prefill time is charged to input tokens, shared decode steps to output tokens.
    result.usd_per_million_input_tokens = per_second * speed.prefill_seconds() / workload.prompt_tokens * 1e6
    result.usd_per_million_output_tokens = per_second * full_step / capacity * 1e6

    tokens_per_request = workload.prompt_tokens + workload.output_tokens
    rate = workload.request_rate
    if rate is None:
        rate = result.assumptions["streams"] / speed.request_seconds(result.batch)
    result.assumptions["requests_per_second"] = rate
    result.usd_per_million_tokens = result.usd_per_hour / 3600.0 / (rate * tokens_per_request) * 1e6


def _check_targets(result: ProfileEstimate, targets: Targets) -> None:
    if targets.max_ttft_ms is not None and result.ttft_ms is not None and result.ttft_ms > targets.max_ttft_ms:
        result.problems.append(f"time to first token {result.ttft_ms:.0f} ms > {targets.max_ttft_ms:g} ms")
    if (targets.min_tokens_per_second is not None and result.tokens_per_second_per_stream is not None
            and result.tokens_per_second_per_stream < targets.min_tokens_per_second):
        result.problems.append(
            f"{result.tokens_per_second_per_stream:.1f} tokens/s per stream < {targets.min_tokens_per_second:g}"
        )
    result.meets_targets = result.fits and not result.problems


def _assumptions(stats: ModelStats, profile: Profile, workload: WorkloadSpec, choice: dict[str, Any],
                 weights: Any) -> dict[str, Any]:
    cm = profile.cost_model
    return {
        "precision": {k: v for k, v in choice.items() if v is not None},
        "weights": {"quantized_bytes": weights.quantized_bytes, "float_bytes": weights.float_bytes,
                    "scale_bytes": weights.scale_bytes, "zero_point_bytes": weights.zero_point_bytes,
                    **weights.assumptions},
        "kv_cache": {"dtype": workload.kv_cache_dtype, "length": workload.kv_length,
                     "bytes_per_token_full_layers": stats.kv_bytes_per_token(workload.kv_cache_dtype, sliding=False),
                     "bytes_per_token_sliding_layers": stats.kv_bytes_per_token(workload.kv_cache_dtype, sliding=True)},
        "efficiency": {"prefill_and_compute": cm.prefill_efficiency, "decode_bandwidth": cm.decode_efficiency},
        "runtime_overhead_gb": cm.runtime_overhead_gb,
        "step_overhead_ms": cm.step_overhead_ms,
        "peak_tflops": profile.hardware.peak_tflops.get(choice["compute_dtype"]),
        "memory_bandwidth_gbps": profile.hardware.memory_bandwidth_gbps,
        "hours_per_month": HOURS_PER_MONTH,
        # NOTE: one device per instance; tensor parallelism across GPUs is not modelled.
        "devices_per_instance": 1,
    }


# --- several profiles --------------------------------------------------------------------------


@dataclass
class CostReport:
    """Estimates across profiles, sorted by cost per million tokens, and the recommendation.

    Attributes:
        workload: each workload setting that all rows share; a setting that differs
            between profiles maps profile names to their values, and its key is listed in
            ``varies_by_profile``.
        notes: remarks about the result, for stdout.
        warnings: doubts about the inputs (such as a context longer than the model's), for stderr.
    """

    model: dict[str, Any]
    workload: dict[str, Any]
    targets: dict[str, Any]
    rows: list[ProfileEstimate]
    cheapest: str | None
    notes: list[str]
    warnings: list[str] = field(default_factory=list)
    calibrations: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = [row.to_dict() for row in self.rows]
        return data


def estimate_costs(
    stats: ModelStats,
    profiles: list[Profile],
    workload: WorkloadSpec | Sequence[WorkloadSpec],
    *,
    quant: str | None = None,
    targets: Targets | Sequence[Targets] | None = None,
    price_per_hour: float | None = None,
) -> CostReport:
    """Estimate ``stats`` on every profile and pick the cheapest one that fits and meets the targets.

    Rows are sorted by dollars per million tokens at the workload; rows without a price or
    that do not fit come last.

    Args:
        stats: the model's sizes.
        profiles: the targets.
        workload: one workload for every profile, or one per profile in the same order.
        quant: weight precision; None uses each profile recipe's.
        targets: latency targets, shared or one per profile; None checks none.
        price_per_hour: hourly price used for profiles that have none.

    Raises:
        UsageError: a negative price, or per-profile lists whose length is not the number of profiles.
    """
    if price_per_hour is not None and not (price_per_hour >= 0 and math.isfinite(price_per_hour)):
        raise UsageError(f"--price-per-hour must be a finite number of 0 or more, got {price_per_hour:g}",
                         hint="pass the instance's on-demand USD price per hour")
    workloads = _per_profile(workload, WorkloadSpec, len(profiles), "workloads")
    target_list = _per_profile(targets or Targets(), Targets, len(profiles), "targets")
    rows = [estimate_profile(stats, p, w, quant=quant, targets=t, price_per_hour=price_per_hour)
            for p, w, t in zip(profiles, workloads, target_list)]
    order = sorted(range(len(rows)), key=lambda i: (
        not rows[i].fits, rows[i].usd_per_million_tokens is None, rows[i].usd_per_million_tokens or 0.0))
    rows = [rows[i] for i in order]
    eligible = [r for r in rows if r.meets_targets and r.usd_per_million_tokens is not None]
    cheapest = eligible[0].profile if eligible else None
    return CostReport(
        model=model_summary(stats),
        workload=_shared_settings([r.profile for r in rows], [r.workload for r in rows]),
        targets=_shared_settings([r.profile for r in rows], [r.targets for r in rows]),
        rows=rows, cheapest=cheapest,
        notes=_result_notes(rows, cheapest, any(t.any for t in target_list)),
        warnings=_context_warnings(stats, workloads),
    )


def _per_profile(value: Any, kind: type, count: int, what: str) -> list[Any]:
    if isinstance(value, kind):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise UsageError(f"got {len(values)} {what} for {count} profiles")
    return values


def _shared_settings(names: list[str], settings: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-row settings: one value where all rows agree, ``{profile: value}`` where they differ."""
    if not settings:
        return {"varies_by_profile": []}
    merged: dict[str, Any] = {}
    varies = []
    for key in settings[0]:
        values = [row[key] for row in settings]
        if all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            merged[key] = dict(zip(names, values))
            varies.append(key)
    merged["varies_by_profile"] = varies
    return merged


def _result_notes(rows: list[ProfileEstimate], cheapest: str | None, targets_set: bool) -> list[str]:
    notes = []
    if rows and not any(r.fits for r in rows):
        closest = min(rows, key=lambda r: r.shortfall_gb)
        notes.append(
            f"the model fits no chosen profile; closest is {closest.profile}, short by {closest.shortfall_gb:.2f} GB"
        )
        return notes
    priced = [r for r in rows if r.fits and r.usd_per_million_tokens is not None]
    if rows and not priced:
        notes.append("no chosen profile that fits has a price, so none is recommended: "
                     "set hardware.price in the profile or pass --price-per-hour")
    elif cheapest is None and targets_set:
        notes.append("no priced profile meets the targets")
    return notes


def _context_warnings(stats: ModelStats, workloads: list[WorkloadSpec]) -> list[str]:
    """Warn when a workload needs a longer context than the model was trained for."""
    if stats.max_context is None:
        return []
    warnings = []
    for length in sorted({w.kv_length for w in workloads}):
        if length > stats.max_context:
            warnings.append(
                f"{length:,} tokens per stream exceed the model's context length of {stats.max_context:,} "
                "(max_position_embeddings in its config); check --prompt-tokens, --output-tokens and --context"
            )
    return warnings


def model_summary(stats: ModelStats) -> dict[str, Any]:
    """Return the model's sizes as plain data for reports."""
    return {
        "name": stats.name, "source": stats.source, "model_type": stats.model_type,
        "total_params": stats.total_params, "active_params": stats.active_params,
        "params_by_role": stats.params_by_role(), "tied_embeddings": stats.tied_embeddings,
        "layers": stats.num_layers, "attention_heads": stats.num_heads, "kv_heads": stats.num_kv_heads,
        "head_dim": stats.head_dim, "experts": stats.num_experts, "experts_per_token": stats.experts_per_token,
        "sliding_window_layers": sum(1 for w in stats.layer_windows if w),
        "max_context": stats.max_context,
        "kv_bytes_per_token_fp16": stats.kv_bytes_per_token("fp16"),
        "kv_bytes_per_token": {dtype: stats.kv_bytes_per_token(dtype) for dtype in KV_CACHE_DTYPES},
        "assumptions": stats.assumptions,
    }
