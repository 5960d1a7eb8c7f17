"""Exact parameter counts, weight bytes and KV-cache bytes from a model's configuration.

Counts follow the Hugging Face implementations of each ``model_type``: the embedding (stored
once when tied to the output head), attention with grouped-query heads and an explicit
``head_dim``, gated or plain MLPs, every norm and bias, and mixture-of-experts layers with
their router, counted both in total and as active per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from llmctl.cost.model_config import ModelConfig
from llmctl.errors import InputError

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
QUANT_PRECISIONS = ("int8", "int4")
PRECISIONS = FLOAT_PRECISIONS + QUANT_PRECISIONS


@dataclass(frozen=True)
class ArchRules:
    """Parameter layout of one decoder layer for a ``model_type``."""

    norms_per_layer: int = 2
    norm_has_bias: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_gated: bool = True
    mlp_bias: bool = False
    lm_head_bias: bool = False


ARCH_RULES: dict[str, ArchRules] = {
    "llama": ArchRules(),
    "mistral": ArchRules(),
    "mixtral": ArchRules(),
    "granite": ArchRules(),
    "phi3": ArchRules(),
    "gemma": ArchRules(),
    "qwen2": ArchRules(qkv_bias=True),
    "qwen2_moe": ArchRules(qkv_bias=True),
    "qwen3": ArchRules(qk_norm=True),
    "qwen3_moe": ArchRules(qk_norm=True),
    # Gemma 2 and 3 wrap both attention and MLP in a pre-norm and a post-norm.
    "gemma2": ArchRules(norms_per_layer=4),
    "gemma3": ArchRules(norms_per_layer=4, qk_norm=True),
    "gemma3_text": ArchRules(norms_per_layer=4, qk_norm=True),
    "gpt_neox": ArchRules(norm_has_bias=True, qkv_bias=True, o_bias=True, mlp_gated=False, mlp_bias=True),
    # Phi-2 runs attention and MLP in parallel after one LayerNorm, and its head has a bias.
    "phi": ArchRules(norms_per_layer=1, norm_has_bias=True, qkv_bias=True, o_bias=True, mlp_gated=False,
                     mlp_bias=True, lm_head_bias=True),
}


@dataclass(frozen=True)
class Linear:
    """A group of identical matrix weights: ``count`` matrices of ``in_features x out_features``."""

    in_features: int
    out_features: int
    count: int
    role: str  # attention, mlp, expert, shared_expert, router, lm_head, embedding

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.count


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the weights at one precision, split by what is quantized and what stays float."""

    precision: str
    quantized_bytes: int
    float_bytes: int
    scale_bytes: int
    zero_point_bytes: int
    assumptions: dict[str, Any]

    @property
    def total(self) -> int:
        return self.quantized_bytes + self.float_bytes + self.scale_bytes + self.zero_point_bytes


@dataclass(frozen=True)
class ModelStats:
    """Sizes of a decoder model derived from its configuration.

    Attributes:
        name: display name.
        source: file or hub id the configuration came from.
        model_type: the Hugging Face ``model_type``.
        layer_windows: per layer, the sliding-window length or None for full attention.
        linears: every matrix weight, grouped.
        other_params: norms and biases, which stay in float at every precision.
        assumptions: how the counts were derived (for ``--json``).
        max_context: the longest sequence the model was trained for
            (``max_position_embeddings``), or None when the config does not say.
    """

    name: str
    source: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    num_experts: int
    experts_per_token: int
    layer_windows: tuple[int | None, ...]
    linears: tuple[Linear, ...]
    other_params: int
    assumptions: dict[str, Any]
    max_context: int | None = None

    # --- parameter counts -------------------------------------------------------------
    def params_by_role(self) -> dict[str, int]:
        """Return parameter counts per role (embedding, attention, mlp, expert, ..., norms_and_biases)."""
        counts: dict[str, int] = {}
        for linear in self.linears:
            counts[linear.role] = counts.get(linear.role, 0) + linear.params
        counts["norms_and_biases"] = self.other_params
        return counts

    @property
    def total_params(self) -> int:
        """All parameters, the tied embedding counted once."""
        return sum(linear.params for linear in self.linears) + self.other_params

    @property
    def active_params(self) -> int:
        """Parameters used for one token: only ``experts_per_token`` of each MoE layer's experts."""
        return self.total_params - self.inactive_expert_params

    @property
    def inactive_expert_params(self) -> int:
        if self.num_experts <= 1:
            return 0
        expert = sum(linear.params for linear in self.linears if linear.role == "expert")
        return expert * (self.num_experts - self.experts_per_token) // self.num_experts

    @property
    def expert_params(self) -> int:
        return sum(linear.params for linear in self.linears if linear.role == "expert")

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def compute_params_per_token(self) -> int:
        """Parameters that take part in the matrix products of one token.

        The input embedding is a table lookup, so it is left out unless it doubles as the
        tied output head.
        """
        lookup_only = 0 if self.tied_embeddings else self.embedding_params
        return self.active_params - lookup_only - self.other_params

    def attention_flops_per_token(self, context: int) -> float:
        """FLOPs of the score and value products for one token attending to ``context`` tokens."""
        total = 0.0
        for window in self.layer_windows:
            span = min(context, window) if window else context
            total += 4.0 * self.num_heads * self.head_dim * span
        return total

    # --- KV cache ----------------------------------------------------------------------
    def kv_bytes_per_token_per_layer(self, kv_dtype: str = "fp16") -> int:
        """Key plus value bytes one layer stores per token: 2 x KV heads x head_dim x bytes."""
        return 2 * self.num_kv_heads * self.head_dim * _dtype_bytes(kv_dtype)

    def kv_bytes_per_token(self, kv_dtype: str = "fp16", *, sliding: bool | None = None) -> int:
        """KV bytes per token summed over layers.

        Args:
            kv_dtype: precision of the cache.
            sliding: None for all layers, True for sliding-window layers only, False for
                full-attention layers only.
        """
        layers = sum(1 for w in self.layer_windows if sliding is None or (w is not None) == sliding)
        return layers * self.kv_bytes_per_token_per_layer(kv_dtype)

    def kv_bytes_for_sequence(self, length: int, kv_dtype: str = "fp16") -> int:
        """KV bytes one sequence of ``length`` tokens needs, sliding-window layers capped at their window."""
        per_layer = self.kv_bytes_per_token_per_layer(kv_dtype)
        return sum(per_layer * (min(length, w) if w else length) for w in self.layer_windows)

    def kv_bytes_window_blind(self, length: int, kv_dtype: str = "fp16") -> int:
        """Return the KV-cache bytes of ``length`` tokens as if no layer had a sliding window."""
        return self.kv_bytes_per_token(kv_dtype) * length

    # --- weight bytes ------------------------------------------------------------------
    def weight_bytes(
        self,
        precision: str,
        *,
        float_dtype: str = "fp32",
        block_size: int = 32,
        symmetric: bool = True,
        int8_mode: str = "weight-only",
        quantize_embeddings: bool = True,
        head_bits: int | None = None,
        include_inactive_experts: bool = True,
    ) -> WeightBytes:
        """Bytes of the weights stored at ``precision``.

        int4 and int8 weight-only follow ONNX Runtime's MatMulNBits layout: per block of
        ``block_size`` input rows and per output column, one scale in ``float_dtype`` and,
        for asymmetric quantization, one zero point packed to the weight's bit width.
        int8 dynamic stores one byte per weight plus a float scale and an 8-bit zero point
        per output column.

        Args:
            precision: fp32, fp16, bf16, int8 or int4.
            float_dtype: precision of everything left in float (norms, biases, scales, and
                the embedding when it is not quantized).
            block_size: quantization block length along the input dimension.
            symmetric: False adds zero points.
            int8_mode: ``weight-only`` (MatMulNBits) or ``dynamic`` (MatMulInteger).
            quantize_embeddings: quantize the token embedding too (the tied head is always
                quantized with the matrices).
            head_bits: bits of the output head when it differs from the method's bits.
            include_inactive_experts: False counts only the experts one token reads.

        Raises:
            InputError: unknown precision.
        """
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}", hint=f"choose one of: {', '.join(PRECISIONS)}")
        float_bytes_each = _dtype_bytes(float_dtype)
        expert_fraction = 1.0
        if not include_inactive_experts and self.num_experts > 1:
            expert_fraction = self.experts_per_token / self.num_experts

        if precision in FLOAT_PRECISIONS:
            each = _dtype_bytes(precision)
            linear_params = sum(_scaled(l.params, l, expert_fraction) for l in self.linears)
            return WeightBytes(precision, 0, linear_params * each + self.other_params * each, 0, 0,
                               {"bytes_per_parameter": each})

        bits = 4 if precision == "int4" else 8
        quantized = float_part = scales = zero_points = 0
        for linear in self.linears:
            count = _scaled(linear.count, linear, expert_fraction)
            if linear.role == "embedding" and not quantize_embeddings:
                float_part += linear.in_features * linear.out_features * count * float_bytes_each
                continue
            layer_bits = head_bits if (linear.role == "lm_head" or self._is_tied_head(linear)) and head_bits else bits
            q, s, z = _quantized_matrix_bytes(linear, count, layer_bits, block_size, symmetric, float_bytes_each,
                                              dynamic=precision == "int8" and int8_mode == "dynamic")
            quantized += q
            scales += s
            zero_points += z
        float_part += self.other_params * float_bytes_each
        assumptions = {
            "bits": bits,
            "block_size": None if int8_mode == "dynamic" and precision == "int8" else block_size,
            "symmetric": symmetric,
            "scale_dtype": float_dtype,
            "int8_mode": int8_mode if precision == "int8" else None,
            "embeddings_quantized": quantize_embeddings,
            "head_bits": head_bits or bits,
        }
        return WeightBytes(precision, quantized, float_part, scales, zero_points, assumptions)

    def _is_tied_head(self, linear: Linear) -> bool:
        return self.tied_embeddings and linear.role == "embedding"

    def decode_read_fraction(self, batch: int) -> float:
        """Share of the stored weights one decode step reads for ``batch`` sequences.

        A step reads every dense matrix and the output head, the input embedding only row
        by row (so not at all when untied), and, for MoE, only the experts the batch routes
        to: with uniform routing, E x (1 - (1 - k/E)^batch) experts per layer.
        """
        total = sum(linear.params for linear in self.linears)
        skipped = 0.0 if self.tied_embeddings else float(self.embedding_params)
        if self.num_experts > 1:
            share = 1.0 - (1.0 - self.experts_per_token / self.num_experts) ** max(batch, 1)
            skipped += self.expert_params * (1.0 - share)
        return max(0.0, (total - skipped) / total)


def _scaled(value: int, linear: Linear, expert_fraction: float) -> int:
    return round(value * expert_fraction) if linear.role == "expert" else value


def _quantized_matrix_bytes(
    linear: Linear, count: int, bits: int, block_size: int, symmetric: bool, scale_bytes: int, *, dynamic: bool
) -> tuple[int, int, int]:
    """Return (packed weight bytes, scale bytes, zero-point bytes) of ``count`` matrices."""
    k, n = linear.in_features, linear.out_features
    if dynamic:
        return k * n * count, n * scale_bytes * count, n * count
    blocks_per_column = math.ceil(k / block_size)
    packed = math.ceil(blocks_per_column * block_size * bits / 8) * n
    scales = blocks_per_column * n * scale_bytes
    zero_points = 0 if symmetric else math.ceil(blocks_per_column * bits / 8) * n
    return packed * count, scales * count, zero_points * count


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}", hint=f"choose one of: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# --- building the statistics from a configuration -------------------------------------------


def model_stats(config: ModelConfig) -> ModelStats:
    """Derive the sizes of the model described by ``config``.

    Raises:
        InputError: a setting the estimate needs is missing or not a positive number; the
            message names the setting and the file.
    """
    values = config.values
    model_type = str(values.get("model_type") or "llama")
    assumptions: dict[str, Any] = {}
    rules = ARCH_RULES.get(model_type)
    if rules is None:
        rules = ArchRules()
        assumptions["architecture"] = f"model_type {model_type!r} is not known; counted as a Llama-style decoder"
    overrides: dict[str, bool] = {}
    if "attention_bias" in values:  # Llama-style: one switch for the q, k, v and o biases
        overrides["qkv_bias"] = overrides["o_bias"] = bool(values["attention_bias"])
    if "mlp_bias" in values:
        overrides["mlp_bias"] = bool(values["mlp_bias"])
    rules = dataclasses.replace(rules, **overrides)

    def need(key: str, *alternatives: str) -> int:
        for name in (key, *alternatives):
            value = values.get(name)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise InputError(f"{config.source}: {name} must be a positive integer, got {value!r}",
                                     hint="fix the value in the config, or pass the model's original config.json")
                return value
        raise InputError(
            f"{config.source}: missing field {key!r}, which the estimate needs",
            hint=f"add {key} to the config (see the model card)",
        )

    hidden = need("hidden_size", "n_embd", "d_model")
    layers = need("num_hidden_layers", "n_layer", "num_layers")
    heads = need("num_attention_heads", "n_head")
    vocab = need("vocab_size")
    kv_heads = values.get("num_key_value_heads") or heads
    head_dim = values.get("head_dim") or hidden // heads
    if hidden % heads and not values.get("head_dim"):
        raise InputError(f"{config.source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
                         hint="add head_dim to the config")
    num_experts = int(values.get("num_local_experts") or values.get("num_experts") or 0)
    experts_per_token = int(values.get("num_experts_per_tok") or 0)
    if num_experts > 1 and experts_per_token < 1:
        raise InputError(f"{config.source}: missing field 'num_experts_per_tok' for a model with {num_experts} experts")
    intermediate = values.get("intermediate_size")
    if intermediate is None and num_experts <= 1:
        intermediate = need("intermediate_size", "n_inner", "ffn_dim")
    tied = bool(values.get("tie_word_embeddings", True))

    linears = _attention_linears(hidden, heads, kv_heads, head_dim, layers)
    linears += _mlp_linears(values, config.source, rules, hidden, layers, intermediate, num_experts, need)
    linears.append(Linear(hidden, vocab, 1, "embedding"))
    if not tied:
        linears.append(Linear(hidden, vocab, 1, "lm_head"))

    other = _norm_and_bias_params(rules, hidden, heads, kv_heads, head_dim, layers, vocab,
                                  _dense_mlp_widths(values, layers, intermediate, num_experts))
    windows = _layer_windows(values, layers)
    assumptions["tied_embeddings"] = tied
    assumptions["sliding_window_layers"] = sum(1 for w in windows if w)

    return ModelStats(
        name=config.name, source=config.source, model_type=model_type, vocab_size=vocab, hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=int(kv_heads), head_dim=int(head_dim),
        intermediate_size=int(intermediate or values.get("moe_intermediate_size") or 0), tied_embeddings=tied,
        num_experts=num_experts if num_experts > 1 else 0,
        experts_per_token=experts_per_token if num_experts > 1 else 0,
        layer_windows=windows, linears=tuple(linears), other_params=other, assumptions=assumptions,
        max_context=_max_context(values),
    )


def _max_context(values: dict[str, Any]) -> int | None:
    value = values.get("max_position_embeddings", values.get("n_positions"))
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _attention_linears(hidden: int, heads: int, kv_heads: int, head_dim: int, layers: int) -> list[Linear]:
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    return [
        Linear(hidden, q_dim, layers, "attention"),
        Linear(hidden, kv_dim, 2 * layers, "attention"),
        Linear(q_dim, hidden, layers, "attention"),
    ]


def _moe_layer_indices(values: dict[str, Any], layers: int) -> list[int]:
    """Indices of the layers whose MLP is a mixture of experts (Qwen-MoE style sparse steps)."""
    step = int(values.get("decoder_sparse_step") or 1)
    dense = set(values.get("mlp_only_layers") or [])
    return [i for i in range(layers) if i not in dense and (i + 1) % step == 0]


def _mlp_linears(values, source, rules, hidden, layers, intermediate, num_experts, need) -> list[Linear]:
    matrices = 3 if rules.mlp_gated else 2
    if num_experts <= 1:
        return _dense_mlp(hidden, intermediate, layers, matrices)

    moe_layers = len(_moe_layer_indices(values, layers))
    dense_layers = layers - moe_layers
    expert_width = values.get("moe_intermediate_size") or intermediate
    if not expert_width:
        need("moe_intermediate_size")
    linears = _dense_mlp(hidden, intermediate, dense_layers, matrices) if dense_layers and intermediate else []
    linears += [
        Linear(hidden, expert_width, (matrices - 1) * num_experts * moe_layers, "expert"),
        Linear(expert_width, hidden, num_experts * moe_layers, "expert"),
        Linear(hidden, num_experts, moe_layers, "router"),
    ]
    shared = values.get("shared_expert_intermediate_size")
    if shared:
        linears += [
            Linear(hidden, shared, (matrices - 1) * moe_layers, "shared_expert"),
            Linear(shared, hidden, moe_layers, "shared_expert"),
            Linear(hidden, 1, moe_layers, "router"),  # the shared expert's sigmoid gate
        ]
    return linears


def _dense_mlp(hidden: int, width: int, layers: int, matrices: int) -> list[Linear]:
    if layers == 0:
        return []
    return [Linear(hidden, width, (matrices - 1) * layers, "mlp"), Linear(width, hidden, layers, "mlp")]


def _dense_mlp_widths(values: dict[str, Any], layers: int, intermediate: int | None, num_experts: int) -> list[int]:
    if num_experts <= 1:
        return [int(intermediate)] * layers
    moe = set(_moe_layer_indices(values, layers))
    return [int(intermediate or 0) for i in range(layers) if i not in moe]


def _norm_and_bias_params(rules, hidden, heads, kv_heads, head_dim, layers, vocab, dense_widths) -> int:
    norm_size = hidden * (2 if rules.norm_has_bias else 1)
    per_layer = rules.norms_per_layer * norm_size
    if rules.qk_norm:
        per_layer += 2 * head_dim
    if rules.qkv_bias:
        per_layer += (heads + 2 * kv_heads) * head_dim
    if rules.o_bias:
        per_layer += hidden
    total = per_layer * layers + norm_size  # plus the final norm
    if rules.mlp_bias:
        gated_extra = 2 if rules.mlp_gated else 1
        total += sum(gated_extra * width + hidden for width in dense_widths)
    if rules.lm_head_bias:
        total += vocab
    return total


def _layer_windows(values: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    """Sliding-window length per layer, or None where the layer attends to the whole context."""
    window = values.get("sliding_window")
    if not window:
        return (None,) * layers
    layer_types = values.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == layers:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    model_type = values.get("model_type")
    pattern = values.get("sliding_window_pattern")
    if model_type in {"gemma3", "gemma3_text"}:
        # Gemma 3: every sliding_window_pattern-th layer is global (6 in the published configs).
        pattern = pattern or 6
        return tuple(None if (i + 1) % pattern == 0 else window for i in range(layers))
    if model_type == "gemma2":
        return tuple(window if i % 2 == 0 else None for i in range(layers))
    if model_type in {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}:
        if not values.get("use_sliding_window"):
            return (None,) * layers
        first_full = int(values.get("max_window_layers") or layers)
        return tuple(window if i >= first_full else None for i in range(layers))
    if values.get("use_sliding_window") is False:
        return (None,) * layers
    return (window,) * layers
