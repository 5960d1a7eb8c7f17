"""Builders for tiny random Hugging Face models with a tokenizer trained locally.

Each builder writes a complete checkpoint folder (config, safetensors weights, tokenizer,
chat template, generation config) that every llmctl command accepts like a real one. The
weights are random but seeded, and initialised with a large standard deviation so that the
next-token distributions are peaked: greedy decoding and top-1 agreement are then meaningful.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(folder: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE tokenizer on the test corpus and save it in ``folder``.

    Returns:
        The size of the trained vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = CORPUS.read_text(encoding="utf-8")
    tokenizer.train_from_iterator([text] * 4, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    wrapped.save_pretrained(folder)
    return len(wrapped)


def _save_model(folder: Path, config, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(folder)
    return folder


def _token_ids(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_llama(
    folder: Path,
    *,
    tie_word_embeddings: bool = True,
    head_dim: int | None = None,
    num_key_value_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a 2-layer Llama-style model with grouped-query attention (4 heads, 2 KV heads).

    Args:
        tie_word_embeddings: share the embedding matrix with the output head (as SmolLM2 does).
        head_dim: an explicit head size different from hidden_size / num_attention_heads.
    """
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = train_tokenizer(folder)
    extra = {"head_dim": head_dim} if head_dim else {}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.4,
        **_token_ids(folder),
        **extra,
    )
    return _save_model(folder, config, seed)


def build_gemma3(folder: Path, *, seed: int = 0) -> Path:
    """Write a 4-layer Gemma-3-style text model: sliding-window and global layers, tied embeddings."""
    from transformers import Gemma3TextConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = train_tokenizer(folder)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        initializer_range=0.4,
        **_token_ids(folder),
    )
    config.architectures = ["Gemma3ForCausalLM"]
    return _save_model(folder, config, seed)
