"""SmolLM2 from its GGUF file: convert, int4, and a greedy answer that still says Paris."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmctl.convert import convert
from llmctl.convert.parity import OnnxCausalLM
from llmctl.profiles import load_profile
from llmctl.quantize import quantize

pytestmark = pytest.mark.realmodel


def greedy_answer(folder: Path, question: str, max_tokens: int = 24) -> str:
    """Answer ``question`` with the artifact's chat template and greedy decoding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    tokens = OnnxCausalLM(folder / "model.onnx").greedy(list(prompt), max_tokens)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_smollm2_int4_answers_paris(smollm2_gguf: Path, tmp_path: Path):
    profile = load_profile(None)
    converted = convert(str(smollm2_gguf), tmp_path / "onnx", profile=profile, dtype="fp32")
    assert converted.summary["parity"]["top1_agreement"] >= 0.99
    assert not (converted.path / "tokenizer.model").exists()

    quantized = quantize(converted.path, tmp_path / "int4", profile=profile, method="int4")
    assert quantized.summary["shared_embedding"] is True
    assert quantized.summary["sizes"]["after_folder_bytes"] <= 90_000_000
    assert "Paris" in greedy_answer(quantized.path, "What is the capital of France?")
