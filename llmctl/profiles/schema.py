"""The schema of a hardware profile: target hardware, runtime, recipe, eval gates, serve defaults.

Every model forbids unknown keys, so a typo in a profile file is an error and not a silently
ignored setting. Cross-field rules live in validators next to the fields they tie together.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dtype = Literal["fp32", "fp16", "bf16", "int8", "int4"]
IsaFeature = Literal[
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimddp", "sve",
    "sve2", "i8mm", "bf16", "fp16",
]
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Price(Strict):
    """On-demand price of one instance of the target, with where the number comes from."""

    usd_per_hour: Annotated[float, Field(ge=0)]
    source: str = Field(min_length=1, description="price list or page the number was read from")
    date: dt.date = Field(description="day the price was read")


class Hardware(Strict):
    """The target machine as the cost model and the recipe need it."""

    kind: Literal["cpu", "gpu"]
    name: str = Field(description="product or instance name, e.g. 'AWS c7i.2xlarge' or 'NVIDIA L4'")
    arch: Literal["x86_64", "arm64"]
    isa: list[IsaFeature] = Field(default_factory=list, description="host CPU instruction-set features")
    cores: PositiveInt = Field(description="CPU cores (vCPUs) available to the runtime")
    memory_gb: PositiveFloat = Field(description="memory the model may use: host RAM for CPUs, device memory for GPUs")
    memory_bandwidth_gbps: PositiveFloat = Field(
        description="memory bandwidth in GB/s: the data sheet's peak for a catalogue target, measured for a "
        "detected one; cost_model.decode_efficiency scales it"
    )
    peak_tflops: dict[Dtype, PositiveFloat] = Field(
        description="dense peak throughput per dtype in TFLOPS (TOPS for int8/int4)"
    )
    price: Price | None = None
    sources: list[str] = Field(default_factory=list, description="data sheets the numbers come from")

    @model_validator(mode="after")
    def _check_isa_matches_arch(self) -> Hardware:
        arm_only = {"neon", "asimddp", "sve", "sve2", "i8mm"}
        x86_only = {f for f in self.isa if f.startswith(("avx", "amx", "sse", "fma", "f16c"))}
        if self.arch == "x86_64" and arm_only.intersection(self.isa):
            raise ValueError(f"arm64 ISA features {sorted(arm_only.intersection(self.isa))} on an x86_64 target")
        if self.arch == "arm64" and x86_only:
            raise ValueError(f"x86 ISA features {sorted(x86_only)} on an arm64 target")
        if "fp32" not in self.peak_tflops:
            raise ValueError("peak_tflops needs at least an fp32 entry")
        return self


class Runtime(Strict):
    """How ONNX Runtime runs on the target."""

    execution_provider: Literal["cpu", "cuda", "tensorrt", "dml", "coreml"] = "cpu"
    threads: Annotated[int, Field(ge=0)] = Field(0, description="intra-op threads; 0 lets the runtime choose")


class Tolerance(Strict):
    """Parity limits between a model and its reference; a field left unset is not checked."""

    max_abs_logit_diff: PositiveFloat | None = None
    min_top1_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    min_greedy_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    max_kl_divergence: Annotated[float, Field(ge=0)] | None = None


class Quantization(Strict):
    """A quantization method and its parameters."""

    method: Literal["int8", "int4"]
    mode: Literal["dynamic", "weight-only"] = Field(
        "weight-only", description="int8 only: ORT dynamic (QDQ MatMulInteger) or 8-bit MatMulNBits"
    )
    block_size: PositiveInt = 32
    symmetric: bool = True
    accuracy_level: Annotated[int, Field(ge=0, le=4)] = 4
    algorithm: Literal["rtn", "hqq", "k_quant"] = "rtn"
    per_channel: bool = Field(False, description="int8 dynamic only: per-channel weight scales")
    quantize_embeddings: bool = Field(True, description="quantize the token embedding and the output head too")
    head_bits: Literal[4, 8] | None = Field(None, description="bits for the output head; None uses the method's bits")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 16 or value & (value - 1):
            raise ValueError(f"block_size {value} must be a power of two >= 16 (16, 32, 64, 128, ...)")
        return value


class Variant(Strict):
    """One candidate the pipeline builds and evaluates."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    quantization: Quantization | None = Field(None, description="None keeps the converted float model")


class Recipe(Strict):
    """How to build a model for the target."""

    exporter: Literal["auto", "optimum", "genai"] = "auto"
    dtype: Literal["fp32", "fp16"] = "fp32"
    quantization: Quantization = Field(default_factory=lambda: Quantization(method="int4"))
    convert_tolerance: Tolerance = Field(
        default_factory=lambda: Tolerance(max_abs_logit_diff=0.05, min_top1_agreement=0.99, min_greedy_agreement=0.9)
    )
    # A floor that catches a broken quantization, not a quality bar: int4 RTN of SmolLM2-135M
    # agrees with its fp32 model on 0.57-0.63 of next tokens. Quality bars belong in eval gates.
    quantize_tolerance: Tolerance = Field(default_factory=lambda: Tolerance(min_top1_agreement=0.4))
    variants: list[Variant] = Field(default_factory=list)
    select: Literal["cheapest", "smallest", "fastest", "best-quality"] = "cheapest"

    @model_validator(mode="after")
    def _unique_variants(self) -> Recipe:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicates)}")
        return self


class Eval(Strict):
    """Default eval suite and extra gates for the target."""

    suite: str | None = Field("quick", description="built-in suite name or a suite file path")
    gates: list[str] = Field(default_factory=list, description="gate expressions such as 'decode_tps >= 50'")


class Serve(Strict):
    """Defaults of ``llmctl serve`` on the target."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    backend: Literal["auto", "genai", "ort", "torch"] = "auto"
    max_concurrency: PositiveInt = 8
    max_queue: Annotated[int, Field(ge=0)] = 64
    max_body_bytes: PositiveInt = 1_048_576
    default_max_tokens: Annotated[int, Field(ge=0)] = Field(
        256, description="max_tokens of a chat request that sets none; 0 fills the rest of the context"
    )


class Workload(Strict):
    """Default workload of ``llmctl cost-estimate``."""

    prompt_tokens: PositiveInt = 512
    output_tokens: PositiveInt = 128
    concurrency: PositiveInt = 1
    context: PositiveInt | None = Field(None, description="KV-cache length per sequence; None is prompt + output")
    kv_cache_dtype: Literal["fp32", "fp16", "bf16", "int8"] = "fp16"
    max_ttft_ms: PositiveFloat | None = Field(None, description="latency target: time to first token in ms")
    min_tokens_per_second: PositiveFloat | None = Field(None, description="latency target: tokens/s per stream")


class CostModel(Strict):
    """Efficiency factors and overheads of the cost model; ``llmctl cost-estimate --calibrate`` replaces them."""

    prefill_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.5
    decode_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.6
    runtime_overhead_gb: Annotated[float, Field(ge=0)] = 0.5
    step_overhead_ms: Annotated[float, Field(ge=0)] = Field(
        0.0, description="fixed time per forward pass (dispatch, sampling, kernel launches), added to each step"
    )
    calibrated_from: str | None = Field(None, description="measurement the efficiency factors were fitted to")


class Profile(Strict):
    """A hardware target and the recipe that suits it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str
    hardware: Hardware
    runtime: Runtime = Field(default_factory=Runtime)
    recipe: Recipe = Field(default_factory=Recipe)
    eval: Eval = Field(default_factory=Eval)
    serve: Serve = Field(default_factory=Serve)
    workload: Workload = Field(default_factory=Workload)
    cost_model: CostModel = Field(default_factory=CostModel)

    @model_validator(mode="after")
    def _provider_matches_kind(self) -> Profile:
        gpu_providers = {"cuda", "tensorrt", "dml"}
        if self.hardware.kind == "cpu" and self.runtime.execution_provider in gpu_providers:
            raise ValueError(
                f"runtime.execution_provider {self.runtime.execution_provider!r} needs a GPU but hardware.kind is 'cpu'"
            )
        return self
