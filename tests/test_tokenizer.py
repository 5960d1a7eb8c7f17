"""ArtifactTokenizer reads tokenizer.json and the chat template without transformers; its ids
must equal transformers' own for the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.errors import RuntimeBackendError, UsageError
from llmctl.runtime.constraints import JsonGrammar
from llmctl.runtime.tokenizer import ArtifactTokenizer

TEXTS = ["hello world", "  leading spaces and a tab\there", "Unicode: café, 東京, 🙂", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour: 🙂"},
    ],
]


def _assert_matches_transformers(folder: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(folder))
    ours = ArtifactTokenizer(folder)
    assert len(ours) == len(reference)
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.pad_token_id == reference.pad_token_id
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text
    assert ours.has_chat_template == bool(reference.chat_template)
    if ours.has_chat_template:
        for messages in CONVERSATIONS:
            expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            assert ours.apply_chat_template(messages) == list(expected)


def _assert_token_bytes_and_grammar(folder: Path) -> None:
    """Token bytes rebuild split characters, and the JSON grammar accepts the tokenizer's own
    tokens for values with spaces and multi-byte characters."""
    ours = ArtifactTokenizer(folder)
    table = ours.token_bytes()
    for text in TEXTS:
        assert b"".join(table[token] for token in ours.encode(text, add_special_tokens=False)) == text.encode(), text

    grammar = JsonGrammar(ours, len(ours), [ours.eos_token_id or 0])
    values = ["New York", "東京 🙂"]
    schema = {"type": "object", "properties": {"city": {"enum": values}}, "required": ["city"], "additionalProperties": False}
    compiled = grammar.compile(schema)
    for value in values:
        constraint = grammar.start(compiled)
        for token in ours.encode(json.dumps({"city": value}, ensure_ascii=False, separators=(",", ":")), add_special_tokens=False):
            assert constraint.allowed()[token], (value, token)
            constraint.accept(token)


def test_tiny_artifact_matches_transformers(tiny_llama_genai: Path) -> None:
    _assert_matches_transformers(tiny_llama_genai)
    _assert_token_bytes_and_grammar(tiny_llama_genai)


@pytest.mark.realmodel
def test_smollm2_matches_transformers(smollm2_genai_fp32: Path) -> None:
    _assert_matches_transformers(smollm2_genai_fp32)
    _assert_token_bytes_and_grammar(smollm2_genai_fp32)


@pytest.mark.realmodel
def test_gemma3_matches_transformers(gemma3_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    # Gemma-3's template folds a system prompt into the first user turn.
    AutoTokenizer.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name).save_pretrained(tmp_path)
    _assert_matches_transformers(tmp_path)
    _assert_token_bytes_and_grammar(tmp_path)


def test_malformed_tokenizer_json_names_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RuntimeBackendError, match="tokenizer.json"):
        ArtifactTokenizer(tmp_path)


def test_template_error_is_usage_error(tiny_llama_genai: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tiny_llama_genai, tmp_path / "artifact")
    folder = tmp_path / "artifact"
    (folder / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}", encoding="utf-8")
    with pytest.raises(UsageError, match="roles must alternate"):
        ArtifactTokenizer(folder).apply_chat_template([{"role": "user", "content": "hi"}])
