"""Which ONNX weight each GGUF tensor becomes, per GGUF architecture.

The names on the ONNX side are those of the ONNX Runtime GenAI model builder's graph
(``model.layers.{i}.attn.q_proj.MatMul.weight``). The builder uses the same names for every
decoder architecture, so the tables here only describe how the GGUF names and layouts differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from llmctl.errors import UnsupportedError

# GGUF tensor name (layer index as {i}) -> component key used by the builder's graph.
_LAYER_COMPONENTS = {
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Builder weights that pack several components along the output dimension, in that order.
PACKED_COMPONENTS = {
    "attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
EMBEDDING = "embed_tokens"
OUTPUT_HEAD = "lm_head"

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Tensor layout rules of one GGUF architecture.

    Attributes:
        gguf_name: the ``general.architecture`` value.
        permuted_qk: the GGUF converter reordered the rows of the query and key projections
            within each head (llama.cpp does this for ``llama``, to pair rotary halves).
    """

    gguf_name: str
    permuted_qk: bool = False


ARCHITECTURES = {
    "llama": ArchitectureSpec("llama", permuted_qk=True),
    "gemma3": ArchitectureSpec("gemma3"),
}


def architecture_spec(architecture: str) -> ArchitectureSpec:
    """Return the layout rules of a GGUF architecture.

    Raises:
        UnsupportedError: the architecture has no tensor-name mapping.
    """
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(
            f"GGUF architecture {architecture!r} has no tensor-name mapping for keeping the quantized blocks "
            f"(supported: {known})",
            hint="pass --dtype fp32 to dequantize it, or --gguf-fallback requantize",
        )
    return spec


def component_key(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to the builder's component key, or None for other tensors.

    ``blk.3.attn_q.weight`` -> ``layers.3.attn.q_proj``; ``token_embd.weight`` ->
    ``embed_tokens``; ``output.weight`` -> ``lm_head``.
    """
    if gguf_name == "token_embd.weight":
        return EMBEDDING
    if gguf_name == "output.weight":
        return OUTPUT_HEAD
    match = _LAYER_NAME.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_COMPONENTS:
        return None
    return f"layers.{match.group(1)}.{_LAYER_COMPONENTS[match.group(2)]}"


def builder_weight_key(initializer_name: str) -> str | None:
    """Map a builder MatMul weight name to its component key, or None.

    ``model.layers.3.attn.qkv_proj.MatMul.weight`` -> ``layers.3.attn.qkv_proj``;
    ``lm_head.MatMul.weight`` -> ``lm_head``.
    """
    if not initializer_name.endswith(".MatMul.weight"):
        return None
    stem = initializer_name[: -len(".MatMul.weight")]
    return stem.removeprefix("model.")


def unpack_key(key: str) -> list[str]:
    """Return the components a (possibly packed) builder key stands for, in packing order."""
    match = re.match(r"^(layers\.\d+)\.(.+)$", key)
    if match and match.group(2) in PACKED_COMPONENTS:
        return [f"{match.group(1)}.{part}" for part in PACKED_COMPONENTS[match.group(2)]]
    return [key]


def row_order(spec: ArchitectureSpec, gguf_name: str, rows: int, head_count: int, head_count_kv: int) -> np.ndarray | None:
    """Return the GGUF row index for each Hugging Face row, or None when the order is the same.

    llama.cpp's converter interleaves the two rotary halves of each query and key head. This
    undoes it exactly as transformers' GGUF loader does, so that the transcoded rows line up
    with the dequantized model the float graph came from.
    """
    if not spec.permuted_qk:
        return None
    if ".attn_q." in gguf_name:
        heads = head_count
    elif ".attn_k." in gguf_name:
        heads = head_count_kv
    else:
        return None
    half = rows // heads // 2
    index = np.arange(rows).reshape(heads, half, 2)
    return index.swapaxes(2, 1).reshape(rows)
