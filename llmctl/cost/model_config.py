"""Reading a model's architecture without loading its weights.

The cost model only needs the numbers in ``config.json`` (or the matching GGUF metadata), so
this module parses them directly: no torch, no transformers, and a hub id is resolved to its
``config.json`` alone through the Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import InputError

# GGUF ``general.architecture`` -> the Hugging Face ``model_type`` with the same layer layout.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
}

# llama.cpp hard-codes this for Gemma 3 (every sixth layer is global); the GGUF does not store it.
GEMMA3_SLIDING_WINDOW_PATTERN = 6


@dataclass(frozen=True)
class ModelConfig:
    """A model's architecture settings as a flat dictionary, plus where they came from.

    Attributes:
        values: the text-model settings (a multimodal config's ``text_config`` merged over
            its top level).
        source: the file or hub id that was read, for messages.
        name: a short display name for the model.
        tensor_names: tensor names when known (GGUF only), used to see whether the output
            head is stored separately.
    """

    values: dict[str, Any]
    source: str
    name: str
    tensor_names: frozenset[str] = field(default_factory=frozenset)


def load_model_config(model: str | Path) -> ModelConfig:
    """Find and parse the architecture settings of ``model``.

    Args:
        model: an artifact or Hugging Face folder (with ``config.json``), a ``config.json``
            file, a ``.gguf`` file, or a hub id such as ``HuggingFaceTB/SmolLM2-135M``.

    Returns:
        The parsed configuration.

    Raises:
        InputError: the path holds no ``config.json``, the file is not valid JSON, or a hub
            id is not in the local cache and the hub cannot be reached.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise InputError(
                f"{path}: no config.json in this folder",
                hint="pass a Hugging Face model folder, an llmctl artifact, a config.json or a .gguf file",
            )
        return _read_json_config(config_path, name=path.name)
    if path.is_file():
        if path.suffix == ".gguf":
            return _read_gguf_config(path)
        return _read_json_config(path, name=path.parent.name or path.stem)
    if path.suffix in {".json", ".gguf"} or os.sep in text and not _looks_like_hub_id(text):
        raise InputError(f"{text}: file not found", hint="check the path")
    if _looks_like_hub_id(text):
        return _read_hub_config(text)
    raise InputError(f"{text}: not a file, a folder or a hub id", hint="pass a model folder, a config.json or owner/name")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _read_json_config(path: Path, name: str) -> ModelConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON: {error}", hint="pass the model's config.json") from error
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
    return ModelConfig(values=_flatten_text_config(data), source=str(path), name=name)


def _flatten_text_config(data: dict[str, Any]) -> dict[str, Any]:
    """Merge a multimodal config's ``text_config`` over its top level.

    Gemma 3 4B and larger, for example, keep the decoder's settings under ``text_config``.
    """
    text_config = data.get("text_config")
    if isinstance(text_config, dict):
        merged = {k: v for k, v in data.items() if k != "text_config"}
        merged.update(text_config)
        merged.setdefault("tie_word_embeddings", data.get("tie_word_embeddings", True))
        return merged
    return dict(data)


def _read_hub_config(repo_id: str) -> ModelConfig:
    """Fetch only ``config.json`` of a hub model: from the cache first, then from the hub.

    huggingface_hub retries a failed connection five times with backoff (about 23 s of
    warnings in version 0.36), so one request without retries checks that the hub answers
    before the download starts.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return _read_json_config(Path(cached), name=repo_id.split("/")[-1])
    if _hub_offline():
        raise InputError(
            f"{repo_id}: config.json is not in the Hugging Face cache, and HF_HUB_OFFLINE forbids downloading it",
            hint="unset HF_HUB_OFFLINE, or pass a local model folder or its config.json",
        )
    _check_hub_reachable(repo_id, constants.ENDPOINT)
    try:
        local = hf_hub_download(repo_id, "config.json")
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise InputError(f"{repo_id}: no such model or no config.json on the hub", hint="check the id") from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:  # the connection broke after the check
        raise InputError(f"{repo_id}: downloading config.json from {constants.ENDPOINT} failed",
                         hint="try again, or pass a local model folder or its config.json") from error
    return _read_json_config(Path(local), name=repo_id.split("/")[-1])


def _hub_offline() -> bool:
    from huggingface_hub import constants

    from_environment = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    return from_environment or bool(constants.HF_HUB_OFFLINE)


def _check_hub_reachable(repo_id: str, endpoint: str) -> None:
    """Send one HEAD request for the config, without retries.

    Any HTTP answer counts as reachable: the download that follows reports missing
    models and access errors itself.

    Raises:
        InputError: the connection fails or times out.
    """
    # A plain request, not huggingface_hub's shared session: that session is cached per process
    # and keeps an offline adapter once it was created while HF_HUB_OFFLINE was set.
    import requests
    from huggingface_hub import constants, hf_hub_url

    url = hf_hub_url(repo_id, "config.json", endpoint=endpoint)
    try:
        requests.head(url, timeout=constants.HF_HUB_ETAG_TIMEOUT, allow_redirects=False)
    except requests.RequestException as error:
        raise InputError(
            f"{repo_id}: config.json is not in the Hugging Face cache and {endpoint} cannot be reached "
            f"({type(error).__name__})",
            hint="pass a local model folder or its config.json, or set HF_HUB_OFFLINE=1 to look only in the cache",
        ) from None


def _read_gguf_config(path: Path) -> ModelConfig:
    """Translate GGUF metadata into the ``config.json`` keys the cost model reads."""
    try:
        from gguf import GGUFReader
    except ImportError as error:  # pragma: no cover - gguf is a declared dependency
        raise InputError(f"{path}: reading GGUF metadata needs the 'gguf' package", hint="pip install gguf") from error

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise InputError(f"{path}: not a readable GGUF file: {error}", hint="check that the download finished") from error

    def scalar(key: str) -> Any:
        field_ = reader.fields.get(key)
        if field_ is None:
            return None
        value = field_.contents()
        return value

    arch = scalar("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        known = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise InputError(f"{path}: GGUF architecture {arch!r} is not supported by the cost model", hint=f"supported: {known}")

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = scalar(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    heads = scalar(f"{arch}.attention.head_count")
    hidden = scalar(f"{arch}.embedding_length")
    values: dict[str, Any] = {
        "model_type": GGUF_ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": scalar(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": scalar(f"{arch}.attention.head_count_kv") or heads,
        "intermediate_size": scalar(f"{arch}.feed_forward_length"),
        "vocab_size": vocab,
        "max_position_embeddings": scalar(f"{arch}.context_length"),
    }
    head_dim = scalar(f"{arch}.attention.key_length")
    if head_dim:
        values["head_dim"] = head_dim
    window = scalar(f"{arch}.attention.sliding_window")
    if window:
        values["sliding_window"] = window
        if arch == "gemma3":
            values["sliding_window_pattern"] = GEMMA3_SLIDING_WINDOW_PATTERN
    experts = scalar(f"{arch}.expert_count")
    if experts:
        values["num_experts"] = experts
        values["num_experts_per_tok"] = scalar(f"{arch}.expert_used_count")
        values["moe_intermediate_size"] = scalar(f"{arch}.expert_feed_forward_length")
    names = frozenset(t.name for t in reader.tensors)
    values["tie_word_embeddings"] = "output.weight" not in names
    values = {k: v for k, v in values.items() if v is not None}
    name = scalar("general.name") or path.stem
    return ModelConfig(values=values, source=str(path), name=str(name), tensor_names=names)
