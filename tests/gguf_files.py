"""Write small GGUF files for tests: from a tiny Hugging Face Llama folder, or single matrices.

The files follow llama.cpp's converter where transformers' GGUF loader depends on it: the
query and key rows are permuted within each head, the tokenizer is stored as ``gpt2`` BPE
tokens and merges, and ``output.weight`` is left out when the embeddings are tied.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# GGUF names of the Hugging Face Llama weights, per layer.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def quantize(matrix: np.ndarray, type_name: str) -> np.ndarray:
    """Quantize a float ``[rows, K]`` matrix into GGUF blocks (uint8 ``[rows, bytes]``)."""
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(np.ascontiguousarray(matrix, dtype=np.float32), GGMLQuantizationType[type_name])


def random_k_blocks(type_name: str, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Return random but well-formed K-quant blocks (the ``gguf`` package cannot quantize K-quants).

    Every byte is random except the float16 super-block scales, which are kept small and
    positive so that the values stay finite.
    """
    import gguf

    rng = np.random.default_rng(seed)
    block_values, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    n_super = columns // block_values
    raw = rng.integers(0, 256, size=(rows, n_super, type_size), dtype=np.uint8)
    scale_offset, scale_count = (208, 1) if type_name == "Q6_K" else (0, 2)
    scales = rng.uniform(0.001, 0.01, size=(rows, n_super, scale_count)).astype(np.float16)
    raw[..., scale_offset : scale_offset + 2 * scale_count] = scales.view(np.uint8).reshape(rows, n_super, 2 * scale_count)
    return raw.reshape(rows, n_super * type_size)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Apply llama.cpp's query/key row permutation (the inverse of transformers' loader)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _add_tokenizer(writer, folder: Path, config: dict) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {entry["content"] for entry in tokenizer.get("added_tokens", [])}
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)


def write_llama_gguf(folder: Path, path: Path, types: dict[str, str], default_type: str = "Q8_0", architecture: str = "llama") -> Path:
    """Write the Llama checkpoint in ``folder`` as a GGUF file with chosen block types.

    Args:
        folder: a tiny Hugging Face Llama folder (``tests.tiny_models.build_llama``).
        path: the GGUF file to write.
        types: GGUF tensor name suffix (``"attn_q"``, ``"token_embd"``) or full name -> block type.
        default_type: the block type of the other matrices; norms stay F32.
        architecture: the ``general.architecture`` to write (another name makes an unmapped file).
    """
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weights = load_file(folder / "model.safetensors")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    _add_tokenizer(writer, folder, config)

    def add(name: str, array: np.ndarray) -> None:
        suffix = name.split(".")[-2]
        type_name = types.get(name, types.get(suffix, default_type if array.ndim == 2 else "F32"))
        if type_name == "F32":
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
            return
        writer.add_tensor(name, quantize(array, type_name), raw_dtype=gguf.GGMLQuantizationType[type_name])

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in LAYER_NAMES.items():
            array = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                array = _permute(array, config["num_attention_heads"])
            elif gguf_name == "attn_k":
                array = _permute(array, config["num_key_value_heads"])
            add(f"blk.{layer}.{gguf_name}.weight", array)
    add("output_norm.weight", weights["model.norm.weight"])
    if not config.get("tie_word_embeddings", False):
        add("output.weight", weights["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
